"""Original P-tuning v2 checkpoints (``ptuning/main.py`` of the ChatGLM2 repository) as ptune checkpoints.

The original saves the whole ``transformer.prefix_encoder`` (its table and, with ``prefix_projection``, its MLP)
in ``pytorch_model.bin`` or ``model.safetensors``. ptune's prefix has the same layout and semantics (real tokens at
positions 0.., prefix keys without rotary), so the tensors load as they are, with no numeric transformation.

This sits apart from ``ptune.chatglm2`` (base-model folders) because it writes a ptune checkpoint: it needs
``ptune.checkpoint``, which needs ``ptune.modeling``, which needs ``ptune.chatglm2``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from ptune.chatglm2 import glm_config, is_original_chatglm2
from ptune.checkpoint import checkpoint_metadata, save_prefix_checkpoint
from ptune.prefix import PrefixEncoder, PrefixShape

ORIGINAL_PREFIX = "transformer.prefix_encoder."


def read_original_prefix(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The prefix-encoder tensors of an original ``ptuning/main.py`` checkpoint, with the original prefix removed."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "model.safetensors").is_file():
        tensors = load_file(str(checkpoint / "model.safetensors"))
    elif (checkpoint / "pytorch_model.bin").is_file():
        tensors = torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{checkpoint}: neither pytorch_model.bin nor model.safetensors; not a P-tuning checkpoint"
        )
    prefix = {k[len(ORIGINAL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ORIGINAL_PREFIX)}
    if "embedding.weight" not in prefix:
        raise ValueError(f"{checkpoint}: no {ORIGINAL_PREFIX}embedding.weight; not a P-tuning v2 checkpoint")
    return prefix


def import_ptuning(
    checkpoint: str | Path,
    base: str | Path,
    out_dir: str | Path,
    max_source_length: int = 64,
    max_target_length: int = 128,
) -> Path:
    """Turn an original P-tuning checkpoint into a ptune one; ``pre_seq_len`` and projection come from the shapes."""
    tensors = read_original_prefix(checkpoint)
    base = Path(base)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    native = glm_config(config) if is_original_chatglm2(base) else AutoConfig.from_pretrained(str(base))
    shape = PrefixShape.from_config(native)
    length, width = tensors["embedding.weight"].shape
    if width != shape.kv_size:
        raise ValueError(
            f"{checkpoint}: prefix rows are {width} wide but {base} needs {shape.kv_size} "
            f"({shape.num_layers} layers x 2 x {shape.num_kv_heads} groups x {shape.head_dim}): another base model"
        )
    projection = "trans.0.weight" in tensors
    hidden = tensors["trans.0.weight"].shape[0] if projection else 0
    prefix = PrefixEncoder(shape, length, projection=projection, projection_hidden_size=hidden)
    prefix.load_state_dict(tensors)
    run_config = {
        "model": {"path": str(base.resolve()), "dtype": "bfloat16", "prompt": {"kind": "chatglm2"}},
        "prefix": {"length": length, "projection": projection, "projection_hidden_size": hidden or None},
        "dataset": {"dir": None, "max_source_length": max_source_length, "max_target_length": max_target_length},
        "imported_from": str(Path(checkpoint).resolve()),
    }
    out_dir = Path(out_dir)
    save_prefix_checkpoint(out_dir, prefix, checkpoint_metadata(prefix, base, run_config))
    return out_dir
