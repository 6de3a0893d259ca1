"""Loading the frozen base model (optionally quantized) and its tokenizer, and identifying it so a checkpoint can
be checked against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ptune.chatglm2.conversion import is_original_chatglm2, load_chatglm2
from ptune.chatglm2.tokenizer import build_chatglm2_tokenizer
from ptune.quantization.layers import check_quantization, quantize_model
from ptune.utils.memory import release_free_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_model_dir(path: str | Path) -> Path:
    """Fail at once, naming the folder and the key to fix, instead of deep inside transformers."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path={path}: no such directory. Point model.path at a local model folder.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json in this folder; is it a Hugging Face model?")
    return folder


def config_sha256(path: str | Path) -> str:
    """Hash of the base model's config.json with keys sorted: identifies the architecture a prefix was trained on."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    folder = check_model_dir(path)
    if is_original_chatglm2(folder):  # its tokenizer class is remote code: rebuilt from tokenizer.model
        return build_chatglm2_tokenizer(folder / "tokenizer.model")
    return AutoTokenizer.from_pretrained(str(folder))


def load_base_model(path: str | Path, dtype: str = "float32", quantization: str | None = None) -> PreTrainedModel:
    """The base causal LM, frozen, in ``dtype`` (bf16/fp16 halve its memory; the prefix always stays fp32), its
    attention and MLP linear layers quantized if ``quantization`` (int8 | int4 | nf4) says so."""
    folder = check_model_dir(path)
    quantization = check_quantization(quantization)
    if is_original_chatglm2(folder):  # an original ChatGLM2 download: converted (and quantized) on load
        model = load_chatglm2(folder, resolve_dtype(dtype), quantization)
        model.set_attn_implementation("sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=resolve_dtype(dtype), attn_implementation="sdpa"
        )
        if quantization:
            quantize_model(model, quantization)
    model.requires_grad_(False)
    release_free_memory()  # the conversion buffers of the load, freed but still resident (CPU: ptune/utils/memory.py)
    return model
