"""Whether a checkpoint's files are the ones that were saved, and what to say when one is not.

A file cut short or with a flipped byte either fails to parse (a bare ``JSONDecodeError`` or ``SafetensorError``
naming no file) or, worse, parses: a changed byte inside ``prefix.safetensors`` is just another weight. So the
SHA256 of every file of a checkpoint is recorded in its ``ptune_checkpoint.json`` (``files``: name -> hash) once the
checkpoint is complete, and checked on load; every damaged or missing file is reported the same way, as
``<path>: truncated or corrupt (...)`` with the older checkpoint of the same run to fall back to.

Checkpoints written before the hashes were recorded have no ``files`` entry: they load as before, each file
checked only by its own parser.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ptune.data.features import file_sha256

HASHES_KEY = "files"
_STEP = re.compile(r"checkpoint-(\d+)$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, cut short, unreadable or not the file that was saved; the message names it."""


def older_checkpoint(checkpoint: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-M`` beside ``checkpoint-N`` with M < N (None: there is none, or no step in the name)."""
    checkpoint = Path(checkpoint)
    match = _STEP.match(checkpoint.name)
    if match is None or not checkpoint.parent.is_dir():
        return None
    step = int(match.group(1))
    older = [
        (int(m.group(1)), p)
        for p in checkpoint.parent.iterdir()
        if (m := _STEP.match(p.name)) and int(m.group(1)) < step and p.is_dir()
    ]
    return max(older)[1] if older else None


def corrupt(path: str | os.PathLike, detail: str) -> CorruptCheckpointError:
    """The error for a damaged file of the checkpoint folder that holds ``path``, with the one to fall back to."""
    path = Path(path)
    older = older_checkpoint(path.parent)
    fallback = (
        f"the older checkpoint {older} is the one to resume from (resume={older}) or to use instead"
        if older
        else "there is no older checkpoint in this run to fall back to"
    )
    return CorruptCheckpointError(f"{path}: truncated or corrupt ({detail}); {fallback}")


def file_hashes(directory: str | os.PathLike, skip: Iterable[str]) -> dict[str, str]:
    """SHA256 of every file in ``directory`` except ``skip`` (the metadata file that records them)."""
    directory, skip = Path(directory), set(skip)
    return {
        p.name: file_sha256(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in skip and not p.name.startswith(".")
    }


def check_file(directory: str | os.PathLike, name: str, meta: dict[str, Any]) -> None:
    """``directory/name`` is the file that was saved: present, with the recorded SHA256 (if one is recorded)."""
    path = Path(directory) / name
    recorded = (meta.get(HASHES_KEY) or {}).get(name)
    if recorded is None:
        return  # an older checkpoint (no hashes), or a file it does not record: its own parser checks it
    if not path.is_file():
        raise corrupt(path, "missing; ptune_checkpoint.json records it")
    if file_sha256(path) != recorded:
        raise corrupt(path, "its SHA256 is not the one recorded in ptune_checkpoint.json when it was saved")


def check_files(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Every file ``meta`` records is present and unchanged (what a resume reads: weights and training state)."""
    for name in meta.get(HASHES_KEY) or {}:
        check_file(directory, name, meta)
