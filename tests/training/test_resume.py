"""Resuming: a finished run stays finished, changed intervals apply, damaged checkpoint files are named, Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptune.checkpoints.format import META_FILE, PREFIX_FILE, read_metadata
from ptune.checkpoints.integrity import CorruptCheckpointError
from ptune.data.features import file_sha256
from ptune.evaluation.scoring import evaluate_target
from ptune.frontends.common import compose_frontend_config, load_model
from ptune.inference.loading import load_checkpoint
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, compose_config

STATE_FILES = ["optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors", "rng_state.json"]


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def steps(run: Path, key: str) -> list[int]:
    return [h["step"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if key in h]


def test_resume_auto_on_a_finished_run_trains_nothing(fast_cfg, tmp_path, caplog):
    """A constant learning rate: one more step would change the weights. Also after a kill between the final save
    and the exit (no trainer_state.json in the run folder yet)."""
    run = tmp_path / "run"
    cfg = fast_cfg("resume=auto", "trainer.lr_scheduler_type=constant")
    loss = train(cfg, str(run))
    before = tree_hashes(run)
    with caplog.at_level(logging.INFO, logger="ptune"):
        assert train(cfg, str(run)) == pytest.approx(loss)
    assert "already reached max_steps=6; nothing to train, nothing written" in caplog.text
    assert tree_hashes(run) == before
    (run / "trainer_state.json").unlink()  # killed after checkpoint-6 was saved, before the run's state
    before = tree_hashes(run)
    assert train(cfg, str(run)) == pytest.approx(loss)
    assert tree_hashes(run) == before and not (run / "checkpoint-7").exists()


def test_changed_intervals_apply_on_resume(fast_cfg, tmp_path, caplog):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(fast_cfg(), str(full))
    with caplog.at_level(logging.INFO, logger="ptune"):
        train(fast_cfg(f"resume={full / 'checkpoint-3'}", "save_steps=1", "trainer.logging_steps=2"), str(resumed))
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    assert [s for s in steps(resumed, "loss") if s > 3] == [4, 6]
    assert [s for s in steps(resumed, "eval_loss") if s > 3] == [4, 5, 6]  # eval_steps follows save_steps
    assert "logging_steps 1 -> 2" in caplog.text and "save_steps 3 -> 1" in caplog.text


@pytest.fixture
def nine_steps(fast_cfg, tmp_path):
    """checkpoint-3, -6 and -9: resuming checkpoint-6 reads every file of it."""
    run = tmp_path / "run"
    train(fast_cfg("max_steps=9"), str(run))
    return run


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def without_hashes(checkpoint: Path) -> None:
    """As a checkpoint written before the hashes were recorded."""
    meta = read_metadata(checkpoint)
    del meta["files"]
    (checkpoint / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("recorded", [True, False], ids=["hashed", "older-unhashed"])
def test_every_damaged_file_names_itself_and_the_older_checkpoint(fast_cfg, nine_steps, recorded):
    checkpoint = nine_steps / "checkpoint-6"
    pristine = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    older = f"the older checkpoint {nine_steps / 'checkpoint-3'} is the one to resume from"
    for name in [PREFIX_FILE, *STATE_FILES, "trainer_state.json", "gone:trainer_state.json"]:
        missing = name.startswith("gone:")
        name = name.removeprefix("gone:")
        if not recorded:
            without_hashes(checkpoint)
        (checkpoint / name).unlink() if missing else cut(checkpoint / name)
        with pytest.raises(CorruptCheckpointError) as info:
            train(fast_cfg("max_steps=9", f"resume={checkpoint}"), str(nine_steps / "again"))
        assert str(info.value).startswith(f"{checkpoint / name}: truncated or corrupt"), (name, str(info.value))
        assert older in str(info.value)
        for file, data in pristine.items():
            (checkpoint / file).write_bytes(data)
    cut(checkpoint / META_FILE)  # the metadata itself: every tool names it
    for load in (
        lambda: train(fast_cfg("max_steps=9", f"resume={checkpoint}"), str(nine_steps / "again")),
        lambda: load_model(compose_frontend_config([f"checkpoint={checkpoint}"])),
    ):
        with pytest.raises(CorruptCheckpointError, match=rf"{checkpoint / META_FILE}: truncated or corrupt \(not"):
            load()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last weight: still a valid safetensors file, another number
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_by_every_load(fast_cfg, nine_steps):
    checkpoint = nine_steps / "checkpoint-6"
    meta = read_metadata(checkpoint)
    assert meta["files"] == {p.name: file_sha256(p) for p in checkpoint.iterdir() if p.name != META_FILE}
    flip_a_byte(checkpoint / PREFIX_FILE)
    named = rf"{checkpoint / PREFIX_FILE}: truncated or corrupt \(its SHA256 is not the one recorded"
    eval_cfg = compose_config("evaluate", f"checkpoint={checkpoint}", "max_samples=2", "metric_processes=1")
    for load in (
        lambda: train(fast_cfg("max_steps=9", f"resume={checkpoint}"), str(nine_steps / "again")),
        lambda: load_checkpoint(checkpoint),
        lambda: evaluate_target(eval_cfg),
        lambda: load_model(compose_frontend_config([f"checkpoint={checkpoint}"])),
    ):
        with pytest.raises(CorruptCheckpointError, match=named):
            load()
    without_hashes(checkpoint)  # an older checkpoint records no hashes: it loads, checked by its parser only
    assert load_checkpoint(checkpoint).checkpoint == str(checkpoint)


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [*FAST, "max_steps=100000", "save_steps=2", f"hydra.run.dir={run}", f"dataset.cache_dir={tmp_path / 'c'}"]
    with subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    ) as proc:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint-2").is_dir() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    found = re.search(
        rf"train\.py: (interrupted at step \d+; the last checkpoint is {run}/checkpoint-\d+: continue with python "
        rf"train\.py resume=auto hydra\.run\.dir={run} \(and the same settings\))\n",
        err,  # after the progress bar's last carriage return
    )
    assert found, err[-2000:]
    assert found.group(1) in (run / "train.log").read_text()
