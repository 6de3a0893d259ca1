"""Pickle-free optimizer / scheduler / RNG state round trips (ptune.checkpoints.state_io)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from ptune.checkpoints import state_io
from ptune.checkpoints.integrity import CorruptCheckpointError
from ptune.checkpoints.state_io import (
    OPTIMIZER_FILES,
    OPTIMIZER_JSON_FILE,
    OPTIMIZER_TENSORS_FILE,
    SCHEDULER_FILE,
    load_optimizer,
    load_rng_state,
    load_scheduler,
    rng_state_files,
    save_optimizer,
    save_rng_state,
    save_scheduler,
)


def _model(seed: int = 0, out_features: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out_features))


def _batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(6, 4, generator=generator)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, scheduler=None) -> None:
    for step in steps:
        optimizer.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False, fused=False),
    "adamw_amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True, foreach=False),
    "adamw_two_groups": lambda params: torch.optim.AdamW(
        [{"params": params[:2], "lr": 3e-3}, {"params": params[2:], "weight_decay": 0.0}],
        lr=1e-2,
        foreach=False,
    ),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=5e-2, momentum=0.9, nesterov=True, foreach=False),
}


def _assert_state_dicts_equal(actual: dict, expected: dict) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, entries in expected["state"].items():
        assert actual["state"][index].keys() == entries.keys()
        for name, value in entries.items():
            got = actual["state"][index][name]
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and got.device == value.device, (index, name)
                assert torch.equal(got, value), (index, name)
            else:
                assert type(got) is type(value) and got == value, (index, name)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_round_trip_resumes_bit_identically(tmp_path, kind):
    model = _model()
    optimizer = OPTIMIZERS[kind](list(model.parameters()))
    _train(model, optimizer, range(3))
    save_optimizer(optimizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OPTIMIZER_FILES)

    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed = OPTIMIZERS[kind](list(resumed_model.parameters()))
    load_optimizer(resumed, tmp_path)
    _assert_state_dicts_equal(resumed.state_dict(), optimizer.state_dict())

    _train(model, optimizer, range(3, 5))
    _train(resumed_model, resumed, range(3, 5))
    for expected, got in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(got, expected)
    _assert_state_dicts_equal(resumed.state_dict(), optimizer.state_dict())


def test_optimizer_files_layout(tmp_path):
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    _train(model, optimizer, range(2))
    save_optimizer(optimizer, tmp_path)

    tensors = load_file(tmp_path / OPTIMIZER_TENSORS_FILE)
    assert set(tensors) == {f"state.{i}.{n}" for i in range(4) for n in ("step", "exp_avg", "exp_avg_sq")}
    # Adam's step is a 0-dim float tensor; its dtype must survive.
    assert tensors["state.0.step"].dtype == torch.float32 and tensors["state.0.step"].dim() == 0
    assert torch.equal(tensors["state.2.exp_avg"], optimizer.state_dict()["state"][2]["exp_avg"])

    payload = json.loads((tmp_path / OPTIMIZER_JSON_FILE).read_text())
    assert payload["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}
    # Loading gives back a tuple, as torch produced it.
    resumed = OPTIMIZERS["adamw"](list(_model().parameters()))
    load_optimizer(resumed, tmp_path)
    assert resumed.param_groups[0]["betas"] == (0.9, 0.999)


def test_optimizer_non_tensor_and_special_values(tmp_path):
    """Non-tensor per-param state (int step, None, inf) and tensor param-group values round-trip."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.25, dtype=torch.float64), momentum=0.0)
    state = optimizer.state_dict()
    state["state"] = {
        0: {"step": 7, "buffer": None, "scale": float("inf"), "dims": (2, 3)},
        1: {"step": torch.tensor(3.0, dtype=torch.float64)},
    }
    optimizer.load_state_dict(state)
    save_optimizer(optimizer, tmp_path)
    assert "param_groups.0.lr" in load_file(tmp_path / OPTIMIZER_TENSORS_FILE)

    resumed = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.5, momentum=0.0)
    load_optimizer(resumed, tmp_path)
    loaded = resumed.state_dict()
    assert loaded["state"][0] == {"step": 7, "buffer": None, "scale": float("inf"), "dims": (2, 3)}
    assert type(loaded["state"][0]["step"]) is int
    step = loaded["state"][1]["step"]
    assert step.dtype == torch.float64 and torch.equal(step, torch.tensor(3.0, dtype=torch.float64))
    lr = resumed.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float64 and lr.item() == 0.25


def test_optimizer_state_tensors_follow_param_device(tmp_path):
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    _train(model, optimizer, range(1))
    save_optimizer(optimizer, tmp_path)
    resumed_model = _model()
    resumed = OPTIMIZERS["adamw"](list(resumed_model.parameters()))
    load_optimizer(resumed, tmp_path)
    for param in resumed_model.parameters():
        assert resumed.state[param]["exp_avg"].device == param.device


def test_optimizer_param_count_mismatch_is_clear(tmp_path):
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    _train(model, optimizer, range(1))
    save_optimizer(optimizer, tmp_path)

    other = OPTIMIZERS["adamw"](list(model.parameters())[:3])
    with pytest.raises(ValueError, match=r"saved for 4 parameters.*has 3 parameters.*different prefix"):
        load_optimizer(other, tmp_path)


def test_optimizer_shape_mismatch_is_clear(tmp_path):
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    _train(model, optimizer, range(1))
    save_optimizer(optimizer, tmp_path)

    other = OPTIMIZERS["adamw"](list(_model(out_features=2).parameters()))
    with pytest.raises(ValueError, match=r"shape.*different prefix configuration"):
        load_optimizer(other, tmp_path)


@pytest.mark.parametrize("missing", OPTIMIZER_FILES)
def test_optimizer_missing_file_names_the_path(tmp_path, missing):
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    save_optimizer(optimizer, tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path / missing)):
        load_optimizer(optimizer, tmp_path)


def test_optimizer_files_from_different_saves_are_rejected(tmp_path):
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    save_optimizer(optimizer, tmp_path / "a")
    save_optimizer(optimizer, tmp_path / "b")
    (tmp_path / "b" / OPTIMIZER_JSON_FILE).replace(tmp_path / "a" / OPTIMIZER_JSON_FILE)
    with pytest.raises(ValueError, match="same save"):
        load_optimizer(optimizer, tmp_path / "a")


SCHEDULERS = {
    "linear": lambda opt: get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=12),
    "cosine": lambda opt: get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=12),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_scheduler_round_trip_continues_lr_sequence(tmp_path, kind):
    def make():
        params = list(_model().parameters())
        optimizer = torch.optim.AdamW(
            [{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}], lr=1e-2, foreach=False
        )
        return optimizer, SCHEDULERS[kind](optimizer)

    optimizer, scheduler = make()
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    save_scheduler(scheduler, tmp_path)
    save_optimizer(optimizer, tmp_path)
    assert (tmp_path / SCHEDULER_FILE).is_file()

    resumed_optimizer, resumed = make()
    load_optimizer(resumed_optimizer, tmp_path)
    load_scheduler(resumed, tmp_path)
    assert resumed.state_dict() == scheduler.state_dict()
    assert resumed.get_last_lr() == scheduler.get_last_lr()

    expected, got = [], []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        expected.append(scheduler.get_last_lr())
        resumed_optimizer.step()
        resumed.step()
        got.append(resumed.get_last_lr())
    assert got == expected
    assert len({tuple(lrs) for lrs in expected}) > 1  # the sequence actually moves


def test_scheduler_lr_lambdas_none_and_dict(tmp_path):
    """LambdaLR stores None for plain functions and ``__dict__`` for callable objects; both must survive."""

    class Decay:
        def __init__(self, factor: float) -> None:
            self.factor = factor

        def __call__(self, step: int) -> float:
            return self.factor**step

    def make(factor: float):
        params = list(_model().parameters())
        optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 1.0 / (step + 1), Decay(factor)])

    scheduler = make(0.5)
    for _ in range(3):
        scheduler.optimizer.step()
        scheduler.step()
    assert scheduler.state_dict()["lr_lambdas"] == [None, {"factor": 0.5}]
    save_scheduler(scheduler, tmp_path)

    resumed = make(0.9)
    load_scheduler(resumed, tmp_path)
    assert resumed.lr_lambdas[1].factor == 0.5
    for sched in (scheduler, resumed):
        sched.optimizer.step()
        sched.step()
    assert resumed.get_last_lr() == scheduler.get_last_lr() == [1.0 / 5, 0.5**4]


def test_scheduler_missing_file_names_the_path(tmp_path):
    scheduler = SCHEDULERS["linear"](torch.optim.SGD(_model().parameters(), lr=0.1))
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path / SCHEDULER_FILE)):
        load_scheduler(scheduler, tmp_path)


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(4).tolist(),
        float(np.random.standard_normal()),  # leaves a cached gaussian in numpy's legacy state
        torch.rand(5),
        torch.randn(3),
    )


def _assert_draws_equal(actual: tuple, expected: tuple) -> None:
    assert actual[:4] == expected[:4]
    assert torch.equal(actual[4], expected[4]) and torch.equal(actual[5], expected[5])


@pytest.mark.parametrize("process_index", [None, 3])
def test_rng_round_trip(tmp_path, process_index):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    _draw()  # advance so gauss caches are populated
    save_rng_state(tmp_path, process_index=process_index)
    expected = _draw()
    expected_again = _draw()

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    load_rng_state(tmp_path, process_index=process_index)
    _assert_draws_equal(_draw(), expected)
    _assert_draws_equal(_draw(), expected_again)

    names = rng_state_files(process_index)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    if process_index is None:
        assert names == ("rng_state.safetensors", "rng_state.json")
    else:
        assert names == ("rng_state_3.safetensors", "rng_state_3.json")


def test_rng_missing_file_names_the_path(tmp_path):
    save_rng_state(tmp_path, process_index=0)
    tensors_name, json_name = rng_state_files(1)
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path / json_name)):
        load_rng_state(tmp_path, process_index=1)
    (tmp_path / tensors_name).unlink(missing_ok=True)
    (tmp_path / rng_state_files(0)[0]).unlink()
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path / rng_state_files(0)[0])):
        load_rng_state(tmp_path, process_index=0)


def test_writes_are_atomic_and_never_pickle(tmp_path, monkeypatch):
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    _train(model, optimizer, range(1))
    scheduler = SCHEDULERS["linear"](optimizer)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.save must not be used")

    monkeypatch.setattr(torch, "save", forbidden)
    replaced = []
    real_replace = state_io.os.replace

    def spy_replace(src, dst):
        assert str(src) != str(dst) and state_io.Path(src).parent == state_io.Path(dst).parent
        replaced.append(state_io.Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(state_io.os, "replace", spy_replace)
    save_optimizer(optimizer, tmp_path)
    save_scheduler(scheduler, tmp_path)
    save_rng_state(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(replaced) == written
    assert written == sorted([*OPTIMIZER_FILES, SCHEDULER_FILE, *rng_state_files()])
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks pickled"


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    scheduler = SCHEDULERS["linear"](torch.optim.SGD(_model().parameters(), lr=0.1))
    save_scheduler(scheduler, tmp_path)
    before = (tmp_path / SCHEDULER_FILE).read_bytes()
    scheduler.optimizer.step()
    scheduler.step()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(state_io.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_scheduler(scheduler, tmp_path)
    assert (tmp_path / SCHEDULER_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [SCHEDULER_FILE]


def test_files_get_the_umask_mode_and_are_fsynced(tmp_path, monkeypatch):
    """Like any file the user writes (0666 less the umask), not mkstemp's 0600 or a fixed 0644; flushed to disk."""
    synced = []
    real_fsync = state_io.os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(state_io.os, "fsync", spy)
    model = _model()
    optimizer = OPTIMIZERS["adamw"](list(model.parameters()))
    _train(model, optimizer, range(1))
    previous = os.umask(0o027)
    try:
        save_optimizer(optimizer, tmp_path)
        save_rng_state(tmp_path)
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        name: 0o640 for name in [*OPTIMIZER_FILES, *rng_state_files()]
    }
    names = [*OPTIMIZER_FILES, *rng_state_files()]
    # each file fsynced under its temporary name (before the rename), the folder after each rename
    assert all(any(os.path.basename(p).startswith(f".{name}.") for p in synced) for name in names), synced
    assert synced.count(str(tmp_path)) == len(names)
