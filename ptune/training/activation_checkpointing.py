"""``trainer.activation_checkpointing=auto``: recompute the layers in backward only when keeping them costs memory.

Gradient checkpointing trades time (every layer's forward runs twice) for memory (one hidden state per layer kept
instead of every activation). Whether the memory matters depends on the run: on a CPU the process's peak resident
memory is often reached while the base model loads (the fp16 checkpoint is converted to the compute dtype), and
activations that fit in what the load already held, and gave back, raise no peak at all. So ``auto`` turns
checkpointing off when ``ptune.training.estimate`` says the activations of the largest micro-batch (in the base's
dtype) fit:

- on a CPU, in the headroom between the process's peak resident memory so far (VmHWM: loading included) and
  its resident memory now (after the load's freed buffers went back: ``ptune.utils.memory``), so that training
  without checkpointing stays under the peak the run has reached anyway;
- on a GPU, in the free device memory less a quarter (the caching allocator's slack and transient buffers), less
  the base's weights still to be moved there.

The largest micro-batch is taken from the training rows: the ``per_device_train_batch_size`` longest rows, packed as
``ptune.data.packing`` packs them (or padded to the longest). The decision and its numbers are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow.compute as pc
import torch
from omegaconf import DictConfig
from torch import nn

from ptune.data.packing import pack_rows
from ptune.training.estimate import ModelShape, activation_bytes

logger = logging.getLogger(__name__)
MB = 2**20
GPU_SLACK = 0.25  # share of the free GPU memory left for the caching allocator's slack and transient buffers


def micro_batch_shape(lengths: Sequence[int], batch: int, pack_length: int | None, multiple_of: int | None):
    """``(sequences, tokens per sequence)`` of the largest micro-batch the collator can build from these rows."""
    longest = sorted(lengths, reverse=True)[:batch]
    if pack_length:
        return len(pack_rows(longest, pack_length)), max(pack_length, longest[0])
    multiple = multiple_of or 1
    return len(longest), -(-longest[0] // multiple) * multiple


def row_lengths(rows: datasets.Dataset) -> list[int]:
    """Token count of every training row, read from the Arrow column (no Python list per row)."""
    return pc.list_value_length(rows.with_format("arrow")["input_ids"]).to_pylist()


def memory_room(device: torch.device, model: nn.Module) -> int:
    """Bytes training may add without checkpointing (see the module docstring)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        pending = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.is_cpu)
        return max(0, int(free * (1 - GPU_SLACK)) - pending)
    peak, now = resident_peak_and_now()
    return max(0, peak - now)


def resident_peak_and_now() -> tuple[int, int]:
    """The process's peak and current resident bytes (Linux ``/proc/self/status`` VmHWM / VmRSS: this program's own
    peak, unlike ``ru_maxrss``, which also holds the parent's resident size at the fork). Elsewhere (0, 0): no room,
    so ``auto`` keeps checkpointing on."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0, 0
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kib = {name: int(fields[name].split()[0]) * 1024 for name in ("VmHWM", "VmRSS") if name in fields}
    return kib.get("VmHWM", 0), kib.get("VmRSS", 0)


def resolve_activation_checkpointing(
    cfg: DictConfig, base: nn.Module, rows: datasets.Dataset, device: torch.device
) -> bool:
    """``trainer.activation_checkpointing`` as a bool: true / false as given; ``auto`` decided as the module
    docstring says, for the loaded ``base`` model, the training ``rows`` and the ``device`` training runs on."""
    value = cfg.trainer.activation_checkpointing
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ValueError(f"trainer.activation_checkpointing={value!r}: use true, false or auto")
    batch, pack_length = cfg.trainer.per_device_train_batch_size, cfg.dataset.get("pack_length")
    sequences, seq = micro_batch_shape(row_lengths(rows), batch, pack_length, cfg.dataset.pad_to_multiple_of)
    shape = ModelShape.from_config(base.config.to_dict())
    prefix = cfg.prefix.length
    # activations in the base's dtype (fp32 base: twice bf16's); a quantized base computes in its float dtype
    need = activation_bytes(shape, sequences, seq, prefix, checkpointing=False, b=base.dtype.itemsize)
    room = memory_room(device, base)
    keep = need > room
    logger.info(
        "trainer.activation_checkpointing=auto: %s (activations without it, %d x %d tokens: ~%.0f MB; room: %.0f MB)",
        "on" if keep else "off",
        sequences,
        seq,
        need / MB,
        room / MB,
    )
    return keep
