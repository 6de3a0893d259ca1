"""Freed C-heap memory handed back to the OS: after the base model loads and after every CPU training step."""

from __future__ import annotations

import pytest

import ptune.utils.memory as memory
from ptune.model.base import load_base_model
from ptune.training.recipe import build_trainer
from tests.conftest import TINY_GLM


@pytest.fixture
def trims(monkeypatch) -> list[int]:
    """Record the calls of malloc_trim instead of making them."""
    calls: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    return calls


def test_release_calls_malloc_trim_with_no_padding_kept(trims):
    assert memory.release_free_memory() is True
    assert trims == [0]


def test_without_glibc_release_does_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_free_memory() is False


def test_the_real_malloc_trim_is_found_and_runs_on_linux():
    if memory._malloc_trim() is None:
        pytest.skip("no glibc here")
    assert memory.release_free_memory() is True


def test_loading_the_base_releases_its_conversion_buffers(trims):
    load_base_model(TINY_GLM, "bfloat16")  # the tiny model is stored in another dtype: converted on load
    assert trims == [0]


def test_cpu_training_releases_after_every_optimizer_step(fast_cfg, tmp_path, trims):
    trainer = build_trainer(fast_cfg("max_steps=3", "save_steps=10"), str(tmp_path / "run"))
    assert any(isinstance(c, memory.ReleaseFreeMemory) for c in trainer.callback_handler.callbacks)
    trims.clear()  # the base model's load
    trainer.args.eval_on_start = False
    trainer.train()
    assert trims == [0, 0, 0]  # one per optimizer step
