"""``trainer.activation_checkpointing=auto``: off when the estimated activations fit the room, on when not."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ptune.training.activation_checkpointing as auto_module
from ptune.training.activation_checkpointing import memory_room, micro_batch_shape, row_lengths
from ptune.training.estimate import ModelShape, activation_bytes
from ptune.training.recipe import build_trainer
from ptune.utils.memory import release_free_memory


@pytest.mark.parametrize(("room", "expected"), [(2**40, False), (0, True)])
def test_auto_turns_checkpointing_off_only_when_the_activations_fit(fast_cfg, tmp_path, monkeypatch, room, expected):
    monkeypatch.setattr(auto_module, "memory_room", lambda device, model: room)
    cfg = fast_cfg("trainer.activation_checkpointing=auto", "max_steps=2")
    trainer = build_trainer(cfg, str(tmp_path / "run"))
    assert trainer.args.activation_checkpointing is expected
    trainer.train()  # the trainer turns the model's checkpointing on (or not) from the resolved argument
    assert trainer.model.base.is_activation_checkpointing is expected


def test_auto_counts_activations_in_the_base_dtype(fast_cfg, tmp_path, monkeypatch):
    """A room that holds the bf16 base's activations but not the fp32 base's (twice the bytes): off, then on."""
    cfg = fast_cfg("model.dtype=bfloat16")
    probe = build_trainer(cfg, str(tmp_path / "probe"))
    lengths = row_lengths(probe.train_dataset)
    batch, data = cfg.trainer.per_device_train_batch_size, cfg.dataset
    sequences, seq = micro_batch_shape(lengths, batch, data.get("pack_length"), data.pad_to_multiple_of)
    shape = ModelShape.from_config(probe.model.base.config.to_dict())
    bf16 = activation_bytes(shape, sequences, seq, cfg.prefix.length, checkpointing=False, b=2)
    monkeypatch.setattr(auto_module, "memory_room", lambda device, model: int(1.5 * bf16))
    for dtype, expected in (("bfloat16", False), ("float32", True)):
        overrides = ("trainer.activation_checkpointing=auto", f"model.dtype={dtype}")
        assert build_trainer(fast_cfg(*overrides), str(tmp_path / dtype)).args.activation_checkpointing is expected


def test_explicit_values_are_kept_and_others_refused(fast_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(auto_module, "memory_room", lambda device, model: 2**40)
    trainer = build_trainer(fast_cfg("trainer.activation_checkpointing=true"), str(tmp_path / "run"))
    assert trainer.args.activation_checkpointing is True  # true stays true however much room there is
    with pytest.raises(ValueError, match=r"trainer.activation_checkpointing='sometimes': use true, false or auto"):
        build_trainer(fast_cfg("trainer.activation_checkpointing=sometimes"), str(tmp_path / "run2"))


def test_the_largest_micro_batch_is_packed_as_the_collator_packs():
    lengths = [50, 120, 90, 130, 70, 60, 140, 30, 100]
    # the 4 longest (140, 130, 120, 100) in bins of 256: 140 + 100, 130 + 120 -> 2 sequences of 256
    assert micro_batch_shape(lengths, 4, 256, None) == (2, 256)
    assert micro_batch_shape(lengths, 4, 128, None) == (4, 140)  # rows longer than the bin stay alone, widen it
    assert micro_batch_shape(lengths, 4, None, 32) == (4, 160)  # unpacked: padded to the longest, rounded up
    assert micro_batch_shape(lengths, 2, None, None) == (2, 140)


def test_cpu_room_is_what_the_process_held_and_gave_back():
    held = 256 * 2**20
    block = torch.ones(held // 4)  # touched: resident, so the peak includes it
    before = memory_room(torch.device("cpu"), torch.nn.Module())
    del block
    assert release_free_memory()
    after = memory_room(torch.device("cpu"), torch.nn.Module())
    assert after - before >= 0.9 * held


def test_cpu_room_does_not_count_the_parent_process():
    """A run started from a large process (a sweep launcher, a notebook) has no room from the parent's memory:
    ``ru_maxrss`` would include the parent's resident size at the fork, the program's own peak does not."""
    held = torch.ones(512 * 2**20 // 4)  # the parent: 512 MB resident
    code = (
        "import torch; from ptune.training.activation_checkpointing import memory_room; "
        "print(memory_room(torch.device('cpu'), torch.nn.Module()))"
    )
    room = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert held.sum() > 0 and room < 256 * 2**20
