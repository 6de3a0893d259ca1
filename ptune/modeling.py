"""Loading the frozen base model and its tokenizer, and identifying it so a checkpoint can be checked against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == "chatglm":
        raise NotImplementedError(
            f"model.path={path}: this is an original ChatGLM folder (model_type 'chatglm', remote code), which "
            "current transformers cannot load; converting it to the native GLM classes is not implemented yet."
        )
    return folder


def config_sha256(path: str | Path) -> str:
    """Hash of the base model's config.json with keys sorted: identifies the architecture a prefix was trained on."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(check_model_dir(path)))


def load_base_model(path: str | Path, dtype: str = "float32") -> PreTrainedModel:
    """The base causal LM, frozen, in ``dtype`` (bf16/fp16 halve its memory; the prefix always stays fp32)."""
    model = AutoModelForCausalLM.from_pretrained(
        str(check_model_dir(path)), dtype=resolve_dtype(dtype), attn_implementation="sdpa"
    )
    model.requires_grad_(False)
    return model
