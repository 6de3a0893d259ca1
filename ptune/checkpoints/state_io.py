"""Pickle-free save/load of the training state that the Hugging Face Trainer keeps next to a checkpoint.

The Trainer writes ``optimizer.pt``, ``scheduler.pt`` and ``rng_state.pth`` with ``torch.save``, i.e. pickle.
The project rule is that only safetensors (plus plain JSON) are ever written, so the Trainer's
``_save_optimizer_and_scheduler`` / ``_load_optimizer_and_scheduler`` / ``_save_rng_state`` /
``_load_rng_state`` are overridden to call the functions here instead.

Layout of what is written (every file atomically and durably, see ``ptune.utils.durable``):

* ``optimizer.safetensors`` - every tensor of ``optimizer.state_dict()``: per-parameter state keyed
  ``state.<param_index>.<name>`` (e.g. ``state.0.exp_avg``, ``state.0.step``), and, should a param group hold
  a tensor (a tensor ``lr``), ``param_groups.<group_index>.<key>``.
* ``optimizer.json`` - ``param_groups`` and the non-tensor per-parameter values, with tensors replaced by
  references to the safetensors keys.
* ``scheduler.json`` - ``scheduler.state_dict()`` (plain Python values only).
* ``trainer_state.json`` - written by transformers itself (plain JSON); read here to name a damaged one.
* ``rng_state.safetensors`` + ``rng_state.json`` (``rng_state_<process_index>.*`` per process when
  distributed) - Python ``random``, NumPy global, torch CPU and every CUDA device's generator.

Values JSON cannot represent faithfully are tagged so that loading rebuilds the exact ``state_dict``:
tuples (``betas``), non-finite floats, dicts with non-string keys, and tensors. The two files of a pair
carry the same random ``save_id`` so that a pair torn apart by an interrupted overwrite is detected instead
of mixed.
"""

from __future__ import annotations

import json
import math
import os
import random
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ptune.checkpoints.integrity import corrupt
from ptune.utils.durable import atomic_write

__all__ = [
    "OPTIMIZER_FILES",
    "OPTIMIZER_JSON_FILE",
    "OPTIMIZER_TENSORS_FILE",
    "RNG_STATE_STEM",
    "SCHEDULER_FILE",
    "TRAINER_STATE_FILE",
    "load_optimizer",
    "load_rng_state",
    "load_scheduler",
    "read_trainer_state",
    "rng_state_files",
    "save_optimizer",
    "save_rng_state",
    "save_scheduler",
]

OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
OPTIMIZER_FILES = (OPTIMIZER_TENSORS_FILE, OPTIMIZER_JSON_FILE)
SCHEDULER_FILE = "scheduler.json"
RNG_STATE_STEM = "rng_state"

_FORMAT_VERSION = 1
_OPTIMIZER_FORMAT = "ptune.optimizer"
_SCHEDULER_FORMAT = "ptune.scheduler"
_RNG_FORMAT = "ptune.rng_state"

# Tags for values that JSON cannot carry as-is. A dict is only ever written as a plain JSON object when its
# keys are all strings and none of them is a tag, so decoding is unambiguous.
_TAG_TENSOR = "__tensor__"
_TAG_TUPLE = "__tuple__"
_TAG_FLOAT = "__float__"
_TAG_DICT = "__dict__"
_TAGS = frozenset({_TAG_TENSOR, _TAG_TUPLE, _TAG_FLOAT, _TAG_DICT})

# Per-parameter optimizer state that always has the parameter's shape (Adam/AdamW/SGD). Checked on load so
# that a checkpoint from a different prefix length fails clearly instead of at the next optimizer step.
_PARAM_SHAPED_STATE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})

_PYTHON_MT_LEN = 625
_NUMPY_KEY_LEN = 624

TensorSink = Callable[[tuple[Any, ...], torch.Tensor], str]


def rng_state_files(process_index: int | None = None) -> tuple[str, str]:
    """Return the ``(safetensors, json)`` file names of the RNG state of one process.

    ``process_index=None`` is the single-process name, mirroring the Trainer's ``rng_state.pth`` vs
    ``rng_state_<i>.pth`` so that each rank of a distributed run restores its own generators.
    """
    stem = RNG_STATE_STEM if process_index is None else f"{RNG_STATE_STEM}_{int(process_index)}"
    return f"{stem}.safetensors", f"{stem}.json"


# ----------------------------------------------------------------------------------------------------
# Writing (atomic and durable: ``ptune.utils.durable``)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=1, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise corrupt(path, "missing: every checkpoint written by ptune has it")


def _read_json(path: Path, expected_format: str) -> dict[str, Any]:
    _require_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise corrupt(path, f"not valid JSON: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise ValueError(f"{path} is not a {expected_format!r} file")
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path} has format version {payload.get('version')!r}; expected {_FORMAT_VERSION}")
    return payload


def _read_tensors(path: Path, save_id: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file on CPU and check it was written by the same save as its JSON companion."""
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = (handle.metadata() or {}).get("save_id")
    except SafetensorError as err:  # e.g. "incomplete metadata", which names no file
        raise corrupt(path, f"not a readable safetensors file: {err}") from None
    if found != save_id:
        raise ValueError(
            f"{path} does not belong to the same save as its JSON file (save_id {found!r} != {save_id!r}); "
            "the checkpoint was probably overwritten partially"
        )
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:  # a header intact, its data cut short
        raise corrupt(path, f"not a readable safetensors file: {err}") from None


def _write_pair(
    directory: Path, tensors_name: str, json_name: str, tensors: dict[str, torch.Tensor], payload: dict
) -> None:
    save_id = uuid.uuid4().hex
    _write_tensors(directory / tensors_name, tensors, {"save_id": save_id, "format": payload["format"]})
    _write_json(directory / json_name, {**payload, "save_id": save_id})


# ----------------------------------------------------------------------------------------------------
# JSON encoding of state dicts


def _encode(value: Any, path: tuple[Any, ...], sink: TensorSink | None) -> Any:
    """Turn a state-dict value into JSON-able data; tensors go to ``sink`` which returns their key."""
    if isinstance(value, torch.Tensor):
        if sink is None:
            raise TypeError(f"Tensor at {'.'.join(map(str, path))} cannot go into a JSON-only state file")
        return {_TAG_TENSOR: sink(path, value)}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG_FLOAT: repr(value)}
    if isinstance(value, tuple):
        return {_TAG_TUPLE: [_encode(v, (*path, i), sink) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, (*path, i), sink) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not _TAGS.intersection(value):
            return {k: _encode(v, (*path, k), sink) for k, v in value.items()}
        return {_TAG_DICT: [[_encode(k, path, None), _encode(v, (*path, k), sink)] for k, v in value.items()]}
    raise TypeError(f"Cannot store value of type {type(value).__name__} at {'.'.join(map(str, path)) or '<root>'}")


def _decode(value: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    """Inverse of :func:`_encode`; ``tensors`` resolves tensor references."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == _TAG_TENSOR:
            if tensors is None or inner not in tensors:
                raise ValueError(f"Tensor {inner!r} referenced by the JSON state is missing")
            return tensors[inner]
        if tag == _TAG_TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _TAG_FLOAT:
            return float(inner)
        if tag == _TAG_DICT:
            return {_decode(k, None): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _tensor_collector() -> tuple[dict[str, torch.Tensor], TensorSink]:
    tensors: dict[str, torch.Tensor] = {}

    def sink(path: tuple[Any, ...], tensor: torch.Tensor) -> str:
        key = ".".join(map(str, path))
        if key in tensors:
            raise ValueError(f"Two optimizer state tensors map to the same key {key!r}")
        # safetensors needs dense CPU tensors; cloning also guarantees no two entries share storage.
        tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        return key

    return tensors, sink


# ----------------------------------------------------------------------------------------------------
# Optimizer


def save_optimizer(optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Write ``optimizer.safetensors`` (all state tensors) and ``optimizer.json`` (everything else).

    Tensors keep their dtype (Adam's 0-dim float ``step`` included), so a resumed run steps bit-identically.
    """
    directory = Path(directory)
    state_dict = optimizer.state_dict()
    tensors, sink = _tensor_collector()
    payload = {
        "format": _OPTIMIZER_FORMAT,
        "version": _FORMAT_VERSION,
        "state": _encode(state_dict["state"], ("state",), sink),
        "param_groups": _encode(state_dict["param_groups"], ("param_groups",), sink),
    }
    _write_pair(directory, OPTIMIZER_TENSORS_FILE, OPTIMIZER_JSON_FILE, tensors, payload)


def _check_matches(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], path: Path) -> None:
    """Fail with a clear message when the saved state is for a different set of trainable parameters."""
    saved_groups = state_dict["param_groups"]
    groups = optimizer.param_groups
    saved_count = sum(len(g["params"]) for g in saved_groups)
    expected = sum(len(g["params"]) for g in groups)
    if saved_count != expected or len(saved_groups) != len(groups):
        raise ValueError(
            f"Optimizer state in {path} was saved for {saved_count} parameters in {len(saved_groups)} "
            f"group(s), but this optimizer has {expected} parameters in {len(groups)} group(s): the "
            "checkpoint belongs to a different prefix configuration"
        )
    for index, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"Optimizer state in {path} has {len(saved['params'])} parameters in group {index}, this "
                f"optimizer has {len(group['params'])}: the checkpoint belongs to a different prefix "
                "configuration"
            )
        for saved_id, param in zip(saved["params"], group["params"], strict=True):
            for name, value in state_dict["state"].get(saved_id, {}).items():
                shape = getattr(value, "shape", None)
                if name in _PARAM_SHAPED_STATE and shape is not None and shape != param.shape:
                    raise ValueError(
                        f"Optimizer state {name!r} of parameter {saved_id} in {path} has shape "
                        f"{tuple(shape)}, the parameter has {tuple(param.shape)}: the checkpoint "
                        "belongs to a different prefix configuration"
                    )


def load_optimizer(optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Rebuild the saved ``state_dict`` exactly and load it into ``optimizer``.

    Tensors are read on CPU; ``optimizer.load_state_dict`` then moves them to the device (and floating
    dtype) of their parameters, keeping ``step`` where torch's own policy wants it (CPU unless
    fused/capturable), exactly as for a checkpoint torch wrote itself.
    """
    directory = Path(directory)
    json_path = directory / OPTIMIZER_JSON_FILE
    tensors_path = directory / OPTIMIZER_TENSORS_FILE
    payload = _read_json(json_path, _OPTIMIZER_FORMAT)
    tensors = _read_tensors(tensors_path, payload["save_id"])
    state_dict = {
        "state": _decode(payload["state"], tensors),
        "param_groups": _decode(payload["param_groups"], tensors),
    }
    _check_matches(optimizer, state_dict, json_path)
    optimizer.load_state_dict(state_dict)


# ----------------------------------------------------------------------------------------------------
# Scheduler


def save_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, directory: str | os.PathLike) -> None:
    """Write ``scheduler.json``; scheduler state is plain Python (``lr_lambdas`` entries are None/dicts)."""
    payload = {
        "format": _SCHEDULER_FORMAT,
        "version": _FORMAT_VERSION,
        "state": _encode(scheduler.state_dict(), (), None),
    }
    _write_json(Path(directory) / SCHEDULER_FILE, payload)


def load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, directory: str | os.PathLike) -> None:
    """Load ``scheduler.json`` so that the learning-rate sequence continues where it stopped."""
    payload = _read_json(Path(directory) / SCHEDULER_FILE, _SCHEDULER_FORMAT)
    scheduler.load_state_dict(_decode(payload["state"], None))


# ----------------------------------------------------------------------------------------------------
# RNG


def save_rng_state(directory: str | os.PathLike, process_index: int | None = None) -> None:
    """Save the Python, NumPy, torch CPU and all CUDA generator states of this process.

    Restoring them makes a resumed run draw the same dropout masks and data order as an uninterrupted one.
    """
    version, python_mt, gauss_next = random.getstate()
    algorithm, numpy_key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors = {
        # Python ints / uint32 words are stored as int64, which holds them exactly.
        "python.mt": torch.tensor(python_mt, dtype=torch.int64),
        "numpy.key": torch.from_numpy(np.asarray(numpy_key, dtype=np.int64)),
        "torch.cpu": torch.random.get_rng_state(),
    }
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for index, state in enumerate(cuda_states):
        tensors[f"cuda.{index}"] = state.cpu()
    payload = {
        "format": _RNG_FORMAT,
        "version": _FORMAT_VERSION,
        "python": {"version": version, "gauss_next": _encode(gauss_next, ("gauss_next",), None)},
        "numpy": {
            "algorithm": algorithm,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": _encode(float(cached_gaussian), ("cached_gaussian",), None),
        },
        "cuda_devices": len(cuda_states),
    }
    tensors_name, json_name = rng_state_files(process_index)
    _write_pair(Path(directory), tensors_name, json_name, tensors, payload)


def load_rng_state(directory: str | os.PathLike, process_index: int | None = None) -> None:
    """Restore the generator states written by :func:`save_rng_state` for ``process_index``.

    CUDA states are restored for as many devices as both the checkpoint and this machine have; a mismatch
    only warns, since the run can continue, merely without bit-exact reproducibility on the GPU.
    """
    directory = Path(directory)
    tensors_name, json_name = rng_state_files(process_index)
    json_path = directory / json_name
    payload = _read_json(json_path, _RNG_FORMAT)
    tensors = _read_tensors(directory / tensors_name, payload["save_id"])

    python_mt = tensors["python.mt"].tolist()
    numpy_key = tensors["numpy.key"].numpy()
    if len(python_mt) != _PYTHON_MT_LEN or numpy_key.shape != (_NUMPY_KEY_LEN,):
        raise ValueError(f"RNG state in {json_path} has unexpected generator sizes")
    py, npy = payload["python"], payload["numpy"]

    random.setstate((py["version"], tuple(python_mt), _decode(py["gauss_next"], None)))
    np.random.set_state(
        (
            npy["algorithm"],
            numpy_key.astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            _decode(npy["cached_gaussian"], None),
        )
    )
    torch.random.set_rng_state(tensors["torch.cpu"])

    saved_cuda = [tensors[f"cuda.{i}"] for i in range(payload["cuda_devices"])]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda and available != len(saved_cuda):
        warnings.warn(
            f"RNG state in {json_path} has {len(saved_cuda)} CUDA generator(s) but {available} CUDA "
            "device(s) are available; restoring the common ones only, GPU randomness will not be reproduced "
            "exactly",
            stacklevel=2,
        )
    elif available and not saved_cuda:
        warnings.warn(f"RNG state in {json_path} has no CUDA generator states", stacklevel=2)
    for index in range(min(available, len(saved_cuda))):
        torch.cuda.set_rng_state(saved_cuda[index], index)


# ----------------------------------------------------------------------------------------------------
# The trainer's own state (written by transformers as plain JSON)

TRAINER_STATE_FILE = "trainer_state.json"


def read_trainer_state(directory: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (step, log history), a missing or damaged one named as such."""
    path = Path(directory) / TRAINER_STATE_FILE
    _require_file(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise corrupt(path, f"not valid JSON: {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise corrupt(path, "no global_step in it")
    return state
