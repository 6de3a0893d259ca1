"""Loading the frozen base model (optionally quantized) and its tokenizer, and identifying it so a checkpoint can
be checked against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ptune.chatglm2.conversion import glm_config, is_original_chatglm2, load_chatglm2
from ptune.chatglm2.tokenizer import build_chatglm2_tokenizer
from ptune.quantization.layers import check_quantization, quantize_model
from ptune.utils.memory import release_free_memory
from ptune.utils.paths import check_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def config_sha256(path: str | Path) -> str:
    """Hash of the base model's config.json with keys sorted: identifies the architecture a prefix was trained on."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


_BOOKKEEPING = ("transformers_version", "_name_or_path", "architectures")  # say how a file was written, not the model


def effective_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    """What a config.json loads to: the native model's full config (defaults filled in, bookkeeping dropped), so two
    folders holding one model in other layouts compare equal, e.g. an original ChatGLM2 folder (translated as
    ``load_base_model`` does) and its ``ptune convert`` output. A saved quantization stays a difference. None: a
    config transformers does not know (then only the file itself can be compared)."""
    raw = dict(raw)
    try:
        if raw.get("model_type") == "chatglm":
            config = glm_config(raw)
            extra = {"quantization_bit": raw["quantization_bit"]} if raw.get("quantization_bit") else {}
        else:
            config, extra = AutoConfig.for_model(raw.pop("model_type"), **raw), {}
    except (KeyError, ValueError, TypeError, NotImplementedError):
        return None
    full = json.loads(config.to_json_string(use_diff=False))
    return {key: value for key, value in full.items() if key not in _BOOKKEEPING} | extra


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
