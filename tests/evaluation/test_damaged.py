"""The evaluator on a run with a damaged checkpoint, and on runs kept under dot-folders (~/.cache, ~/.local)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from ptune.checkpoints.format import META_FILE, PREFIX_FILE, read_metadata
from ptune.evaluation.scoring import evaluate_target
from ptune.training.recipe import train
from tests.conftest import FAST, compose_config, compose_train
from tests.training.test_resume import cut, flip_a_byte


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """checkpoint-3 and checkpoint-6 of a short real run."""
    root = tmp_path_factory.mktemp("damaged")
    train(compose_train(*FAST, cache_dir=root / "cache"), str(root / "run"))
    return root / "run"


def evaluate(target, *overrides):
    options = ["max_samples=2", "batch_size=2", "metric_processes=1", *overrides]
    return evaluate_target(compose_config("evaluate", f"checkpoint={target}", *options))


def test_a_corrupt_checkpoint_is_skipped_and_the_rest_scored(run, tmp_path, caplog):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    flip_a_byte(copy / "checkpoint-3" / PREFIX_FILE)  # recorded hash: caught before any generation
    with caplog.at_level(logging.WARNING, logger="ptune"):
        rows = evaluate(copy)
    assert [r["step"] for r in rows] == [6]
    damaged = copy / "checkpoint-3" / PREFIX_FILE
    assert f"skipping {copy / 'checkpoint-3'}, not scored: {damaged}: truncated or corrupt" in caplog.text
    # the run's table, of what could be scored (max_samples: in the eval-ID folder of these options)
    (table_file,) = copy.glob("eval-*/eval_results.md")
    table = table_file.read_text()
    assert str(copy / "checkpoint-6") in table and str(copy / "checkpoint-3") not in table
    # an older checkpoint (no hashes) whose weights are cut: found when loading, skipped the same way
    meta = read_metadata(copy / "checkpoint-6")
    del meta["files"]
    (copy / "checkpoint-6" / META_FILE).write_text(json.dumps(meta))
    cut(copy / "checkpoint-6" / PREFIX_FILE)
    shutil.copytree(run / "checkpoint-3", copy / "checkpoint-9")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptune"):
        rows = evaluate(copy, "force=true")
    assert [r["checkpoint"] for r in rows] == [str(copy / "checkpoint-9")]
    assert f"skipping {copy / 'checkpoint-6'}, not scored" in caplog.text
    with pytest.raises(ValueError, match=rf"{copy / 'checkpoint-3' / PREFIX_FILE}: truncated or corrupt"):
        evaluate(copy / "checkpoint-3")  # alone: refused, not skipped


@pytest.mark.parametrize("above", [".cache/runs", ".local/share", "home/me/.work"])
def test_dot_folders_above_the_run_are_the_users_business(run, tmp_path, above):
    kept = tmp_path / above / "run"
    shutil.copytree(run, kept)
    assert [r["step"] for r in evaluate(kept)] == [3, 6]
    assert [r["step"] for r in evaluate(kept / "checkpoint-6")] == [6]
    (kept / ".staging" / "checkpoint-9").mkdir(parents=True)  # inside the run: a save in progress, never scored
    shutil.copy(kept / "checkpoint-6" / META_FILE, kept / ".staging" / "checkpoint-9" / META_FILE)
    assert [r["step"] for r in evaluate(kept)] == [3, 6]
    with pytest.raises(FileNotFoundError, match=r"inside \.staging/"):
        evaluate(kept / ".staging" / "checkpoint-9")
