"""Prefix checkpoints: the prefix weights (safetensors) and everything needed to rebuild and check them.

``checkpoint-N/`` holds ``prefix.safetensors`` (a few MB even for a 6B base; never base weights) and
``ptune_checkpoint.json``: the resolved run config, the prefix's shape and options, the prompt format, the
source/target lengths, the base model's path, config.json, its hash and quantization, so later tools need
nothing retyped and a changed base is caught (``ptune.checkpoints.config_checks``), and the SHA256 of every other
file of the folder, so a damaged one is caught (``ptune.checkpoints.integrity``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ptune.checkpoints.integrity import HASHES_KEY, check_file, corrupt, file_hashes
from ptune.model.base import config_sha256
from ptune.model.prefix import PrefixEncoder, PrefixShape
from ptune.utils.durable import atomic_write, atomic_write_bytes

PREFIX_FILE = "prefix.safetensors"
META_FILE = "ptune_checkpoint.json"
FORMAT_VERSION = 1
STAGING_DIR = ".staging"  # in a run folder: checkpoints being written, renamed to checkpoint-N when complete


def build_prefix(shape: PrefixShape, prefix_cfg: dict[str, Any], hidden_size: int) -> PrefixEncoder:
    """A fresh prefix from the ``prefix`` config group; the projection width defaults to the model's hidden size."""
    return PrefixEncoder(
        shape,
        length=int(prefix_cfg["length"]),
        projection=bool(prefix_cfg["projection"]),
        projection_hidden_size=int(prefix_cfg.get("projection_hidden_size") or hidden_size),
        dropout=float(prefix_cfg.get("dropout", 0.0)),
    )


def checkpoint_metadata(
    prefix: PrefixEncoder, base_path: str | os.PathLike, run_config: dict[str, Any], quantization: str | None = None
) -> dict[str, Any]:
    """What a checkpoint records besides the weights; ``quantization``: how the base's layers were loaded (int8,
    int4, nf4 or None), so the tools that load the checkpoint load the base the same way."""
    projection = prefix.trans is not None
    return {
        "format_version": FORMAT_VERSION,
        "prefix": {
            "length": prefix.length,
            "projection": projection,
            "projection_hidden_size": prefix.trans[0].out_features if projection else None,
            "dropout": prefix.dropout.p,
            "shape": vars(prefix.shape),
        },
        "base_model": {
            "path": str(Path(base_path).resolve()),
            "config_sha256": config_sha256(base_path),
            "config": json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8")),  # names changes
            "quantization": quantization,
        },
        "config": run_config,
    }


def save_prefix_checkpoint(directory: str | os.PathLike, prefix: PrefixEncoder, metadata: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in prefix.state_dict().items()}
    atomic_write(directory / PREFIX_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    record_file_hashes(directory, metadata)


def record_file_hashes(directory: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """(Re)write ``ptune_checkpoint.json`` as ``metadata`` plus the SHA256 of every other file now in the folder:
    called again by the trainer once the optimizer, scheduler, RNG and trainer states are written too."""
    directory = Path(directory)
    recorded = {**metadata, HASHES_KEY: file_hashes(directory, skip=[META_FILE])}
    atomic_write_bytes(directory / META_FILE, json.dumps(recorded, indent=2, ensure_ascii=False).encode())


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """``ptune_checkpoint.json`` of a checkpoint folder; a folder that is not one says what it is instead."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: {_not_a_checkpoint(directory)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise corrupt(path, f"not valid JSON: {err}") from None
    if not isinstance(meta, dict) or not {"prefix", "base_model", "config"} <= meta.keys():
        raise corrupt(path, "not the metadata ptune writes: prefix, base_model or config missing")
    return meta


def _not_a_checkpoint(directory: Path) -> str:
    """Why a folder without ``ptune_checkpoint.json`` is no checkpoint: absent, a run folder (naming its newest
    checkpoint), or something else."""
    if not directory.exists():
        return "no such folder"
    inside = sorted(
        (int(p.name.split("-")[1]), p) for p in directory.glob("checkpoint-*") if p.name.split("-")[1].isdigit()
    )
    if inside:
        return f"a run folder, not a checkpoint; its newest checkpoint is {inside[-1][1]} (give that)"
    return f"no {META_FILE}; this is not a ptune checkpoint folder"


def load_prefix_weights(directory: str | os.PathLike, prefix: PrefixEncoder) -> None:
    """Load ``prefix.safetensors`` into ``prefix``, naming the file and the mismatch if it does not fit."""
    path = Path(directory) / PREFIX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {PREFIX_FILE}; this is not a ptune checkpoint folder")
    check_file(directory, PREFIX_FILE, read_metadata(directory))
    try:
        state = load_file(str(path))
    except SafetensorError as err:  # e.g. a file cut short: "incomplete metadata", which names no file
        raise corrupt(path, f"not a readable safetensors file: {err}") from None
    expected = {name: tuple(t.shape) for name, t in prefix.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        raise ValueError(
            f"{path}: the saved prefix {found} does not fit the configured one {expected} "
            "(other prefix length, projection or base model)"
        )
    prefix.load_state_dict(state)
