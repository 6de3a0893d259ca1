"""Original P-tuning v2 checkpoints (``ptuning/main.py`` of the ChatGLM2 repository) as ptune checkpoints, and back.

The original saves the whole ``transformer.prefix_encoder`` (its table and, with ``prefix_projection``, its MLP)
in ``pytorch_model.bin`` or ``model.safetensors``. ptune's prefix has the same layout and semantics (real tokens at
positions 0.., prefix keys without rotary), so the tensors load as they are, with no numeric transformation.

This sits apart from ``ptune.chatglm2.conversion`` (base-model folders) because it writes a ptune checkpoint: it needs
``ptune.checkpoints.format``, which needs ``ptune.model.base``, which needs ``ptune.chatglm2.conversion``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from ptune.chatglm2.conversion import chatglm2_config, glm_config, is_original_chatglm2
from ptune.chatglm2.files import stored_quantization
from ptune.checkpoints.format import (
    build_prefix,
    checkpoint_metadata,
    load_prefix_weights,
    read_metadata,
    save_prefix_checkpoint,
)
from ptune.model.prefix import PrefixEncoder, PrefixShape
from ptune.utils.durable import staged_folder

ORIGINAL_PREFIX = "transformer.prefix_encoder."


def read_original_prefix(checkpoint: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The file and the prefix-encoder tensors of an original ``ptuning/main.py`` checkpoint (names without the
    original ``transformer.prefix_encoder.``)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "model.safetensors").is_file():
        path = checkpoint / "model.safetensors"
        tensors = load_file(str(path))
    elif (checkpoint / "pytorch_model.bin").is_file():
        path = checkpoint / "pytorch_model.bin"
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{checkpoint}: neither pytorch_model.bin nor model.safetensors; not a P-tuning checkpoint"
        )
    prefix = {k[len(ORIGINAL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ORIGINAL_PREFIX)}
    if "embedding.weight" not in prefix:
        raise ValueError(f"{path}: no {ORIGINAL_PREFIX}embedding.weight; not a P-tuning v2 checkpoint")
    return path, prefix


def _check_saved_config(checkpoint: Path, tensors: dict[str, torch.Tensor], shape: PrefixShape, base: Path) -> None:
    """The config.json the original saved beside its weights: its prefix length, projection and layer/head split
    must be what the tensors and the base say (the row width alone cannot tell 28 x 2 x 128 from 14 x 4 x 128)."""
    path = checkpoint / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    rows = tensors["embedding.weight"].shape[0]
    if saved.get("pre_seq_len") not in (None, rows):
        raise ValueError(f"{path}: pre_seq_len {saved['pre_seq_len']}, but the saved prefix has {rows} rows")
    if "prefix_projection" in saved and bool(saved["prefix_projection"]) != ("trans.0.weight" in tensors):
        has = "has" if "trans.0.weight" in tensors else "has no"
        raise ValueError(f"{path}: prefix_projection {saved['prefix_projection']}, but the checkpoint {has} MLP")
    if "num_layers" in saved:
        heads = saved["num_attention_heads"]
        kv_heads = saved["multi_query_group_num"] if saved.get("multi_query_attention") else heads
        trained = PrefixShape(saved["num_layers"], kv_heads, saved["kv_channels"])
        if trained != shape:
            raise ValueError(
                f"{path}: trained on {trained.num_layers} layers x {trained.num_kv_heads} key/value groups x "
                f"{trained.head_dim} channels, but {base} has {shape.num_layers} x {shape.num_kv_heads} x "
                f"{shape.head_dim}: another base model"
            )


def import_ptuning(
    checkpoint: str | Path,
    base: str | Path,
    out_dir: str | Path,
    max_source_length: int = 64,
    max_target_length: int = 128,
) -> Path:
    """Turn an original P-tuning checkpoint into a ptune one; ``pre_seq_len`` and projection come from the shapes
    (and must agree with the checkpoint's config.json when it has one)."""
    path, tensors = read_original_prefix(checkpoint)
    base = Path(base)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    native = glm_config(config) if is_original_chatglm2(base) else AutoConfig.from_pretrained(str(base))
    shape = PrefixShape.from_config(native)
    _check_saved_config(Path(checkpoint), tensors, shape, base)
    length, width = tensors["embedding.weight"].shape
    if width != shape.kv_size:
        raise ValueError(
            f"{path}: prefix rows are {width} wide but {base} needs {shape.kv_size} "
            f"({shape.num_layers} layers x 2 x {shape.num_kv_heads} groups x {shape.head_dim}): another base model"
        )
    projection = "trans.0.weight" in tensors
    hidden = tensors["trans.0.weight"].shape[0] if projection else 0
    prefix = PrefixEncoder(shape, length, projection=projection, projection_hidden_size=hidden)
    expected = {name: tuple(t.shape) for name, t in prefix.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    wrong = sorted(name for name in expected.keys() | found.keys() if found.get(name) != expected.get(name))
    if wrong:
        shapes = "; ".join(f"{name}: {found.get(name)} (expected {expected.get(name)})" for name in wrong)
        raise ValueError(f"{path}: the prefix encoder does not fit a {length}-row prefix for {base}: {shapes}")
    prefix.load_state_dict(tensors)
    run_config = {
        "model": {"path": str(base.resolve()), "dtype": "bfloat16", "prompt": {"kind": "chatglm2"}},
        "prefix": {"length": length, "projection": projection, "projection_hidden_size": hidden or None},
        "dataset": {"dir": None, "max_source_length": max_source_length, "max_target_length": max_target_length},
        "imported_from": str(Path(checkpoint).resolve()),
    }
    out_dir = Path(out_dir)
    quantization = stored_quantization(base) if is_original_chatglm2(base) else None
    save_prefix_checkpoint(out_dir, prefix, checkpoint_metadata(prefix, base, run_config, quantization))
    return out_dir


def original_base_config(checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The base's config.json in the original's keys: as the original saved it for an original ChatGLM2 folder,
    derived from the native config for a converted one (``ptune convert``); any other base is refused."""
    base = meta["base_model"]
    config, model_type = base["config"], base["config"].get("model_type")
    where = f"{checkpoint}: its base {base['path']}"
    try:
        if model_type == "chatglm":
            glm_config(config)  # refuses what is not ChatGLM2's function (rope_ratio, other flags)
            return dict(config)
        if model_type == "glm":
            return chatglm2_config(config)
    except (NotImplementedError, KeyError) as err:
        raise ValueError(f"{where} is no ChatGLM2 model ({err}); the original P-tuning layout is ChatGLM2's") from None
    raise ValueError(
        f"{where} is a {model_type!r} model; the original P-tuning layout holds ChatGLM2 prefixes only (model_type "
        "chatglm, or glm as ptune convert writes it)"
    )


def _check_original_shape(checkpoint: Path, prefix: PrefixEncoder, config: dict[str, Any]) -> None:
    """The original's PrefixEncoder: rows of num_layers x 2 x multi_query_group_num x kv_channels, and a projection
    as wide as hidden_size (it has no width of its own)."""
    groups, channels, layers = config["multi_query_group_num"], config["kv_channels"], config["num_layers"]
    shape = prefix.shape
    if (shape.num_layers, shape.num_kv_heads, shape.head_dim) != (layers, groups, channels):
        raise ValueError(
            f"{checkpoint}: the prefix has {shape.num_layers} layers x {shape.num_kv_heads} key/value heads x "
            f"{shape.head_dim} channels, but the original has one key/value width per layer, multi_query_group_num "
            f"x kv_channels = {groups} x {channels} ({layers} layers): it cannot hold this prefix"
        )
    hidden = prefix.trans[0].out_features if prefix.trans is not None else config["hidden_size"]
    if hidden != config["hidden_size"]:
        raise ValueError(
            f"{checkpoint}: prefix.projection_hidden_size={hidden}, but the original's projection is as wide as "
            f"hidden_size={config['hidden_size']}: retrain with prefix.projection_hidden_size=null"
        )


def export_ptuning(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a ptune checkpoint in the original layout that ``ptuning/main.py``, ``web_demo.py`` and chatglm.cpp read:
    ``pytorch_model.bin`` with only the ``transformer.prefix_encoder.*`` tensors (the original loads it with
    ``torch.load`` and strips that prefix), and ``config.json``, the base's with ``pre_seq_len`` and
    ``prefix_projection`` (chatglm.cpp reads those with ``num_layers``, ``multi_query_group_num``, ``kv_channels``).

    This is the one ``.bin`` ptune writes, because the original reads nothing else: a plain dict of tensors, which
    loads with ``torch.load(weights_only=True)``. Written whole or not at all (``staged_folder``)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    meta = read_metadata(checkpoint)
    config = original_base_config(checkpoint, meta)
    saved = meta["prefix"]
    prefix = build_prefix(PrefixShape(**saved["shape"]), saved, config["hidden_size"])
    load_prefix_weights(checkpoint, prefix)
    _check_original_shape(checkpoint, prefix, config)
    tensors = {ORIGINAL_PREFIX + name: t.detach().contiguous() for name, t in prefix.state_dict().items()}
    config = {**config, "pre_seq_len": prefix.length, "prefix_projection": prefix.trans is not None}
    with staged_folder(out_dir) as staging:
        torch.save(tensors, staging / "pytorch_model.bin")
        (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir
