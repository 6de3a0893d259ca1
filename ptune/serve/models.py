"""The models one ``ptune serve`` answers as: one base, loaded once, and every checkpoint given on it, plus the bare
base under ``base_name`` (the engine process's side; it imports torch).

    ptune serve checkpoint=A,B,C          several checkpoints (or checkpoint=FOLDER: every checkpoint in it)

Each is named by its folder (``model_names=[a,b,c]`` names them instead); a request's ``model`` picks one, and
``base_name`` (default ``base``) answers with no prefix at all: the frozen base as it was before any tuning. Their
rows share one batch, each attending to its own prefix only (``BatchDecoder``). Checkpoints trained on different
bases are refused, naming the config keys that differ (``ptune.inference.loading.load_prefix_on``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptune.checkpoints.format import META_FILE
from ptune.data.prompts import PromptFormat
from ptune.frontends.common import load_model, prompt_limit
from ptune.inference.loading import LoadedModel, load_prefix_on


@dataclasses.dataclass
class Served:
    """One name ``ptune serve`` answers as: how its prompts are built (``loaded``) and the prefix its rows carry
    ("own": the loaded model's; a tensor: another checkpoint's keys/values; None: the bare base)."""

    name: str
    loaded: LoadedModel
    prefix: torch.Tensor | str | None


def checkpoint_paths(value: str | None) -> list[Path]:
    """``checkpoint=A,B`` as paths; a folder that is no checkpoint itself gives the checkpoints inside it."""
    paths: list[Path] = []
    for part in (p.strip() for p in str(value or "").split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        inside = sorted(c.parent for c in path.glob(f"*/{META_FILE}")) if path.is_dir() else []
        paths += inside if inside and not (path / META_FILE).exists() else [path]
    return paths


def load_served(cfg: DictConfig) -> list[Served]:
    """Every model served, the default (the first checkpoint, or the bare base without one) first."""
    paths = checkpoint_paths(cfg.checkpoint)
    first = load_model(OmegaConf.merge(cfg, {"checkpoint": str(paths[0]) if paths else None}))
    base_name = str(cfg.base_name)
    if not paths:
        return [Served(base_name, first, None)]
    names = _names(paths, cfg.model_names)
    if base_name in names:
        raise ValueError(f"base_name={base_name} is also a checkpoint's name; set base_name=... to another")
    served = [Served(names[0], first, "own")]
    for name, path in zip(names[1:], paths[1:], strict=True):
        loaded, kv = load_prefix_on(first, path, bool(cfg.allow_base_mismatch))
        loaded.max_source_length = prompt_limit(cfg.max_source_length, loaded)
        served.append(Served(name, loaded, kv))
    bare = dataclasses.replace(
        first,
        prompt_format=PromptFormat.from_config(OmegaConf.to_container(cfg.model.prompt)),
        max_source_length=cfg.max_source_length,
        checkpoint=None,
        metadata=None,
    )
    bare.max_source_length = prompt_limit(cfg.max_source_length, bare)
    return [*served, Served(base_name, bare, None)]


def _names(paths: list[Path], configured: list[str] | None) -> list[str]:
    if configured is not None:
        if len(configured) != len(paths):
            raise ValueError(f"model_names has {len(configured)} names for {len(paths)} checkpoints: {paths}")
        names = [str(n) for n in configured]
    else:
        names = [p.name for p in paths]
        if len(set(names)) < len(names):  # checkpoint-200 of two runs: name them by run too
            names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        raise ValueError(f"two checkpoints would have the same name ({names}); name them with model_names=[...]")
    return names
