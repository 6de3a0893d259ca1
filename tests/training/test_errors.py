"""What the user can fix gets one line, from train.py, evaluate.py and the front ends alike; the traceback stays
behind HYDRA_FULL_ERROR=1; a failed launch's folder says why it failed."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptune.cli import main as cli
from ptune.evaluation.command import evaluate_command
from ptune.training.hydra_setup import error_line
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, compose_config
from tests.training.test_recipe import run_cli


def script(name: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(sys.executable, str(REPO / name), *args, cwd=cwd, timeout=300, env_extra=env)


def one_line(stderr: str) -> str:
    """The error line, with nothing of a traceback around it."""
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("train.py:", "evaluate.py:"))]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_bad_data_is_one_line_and_the_run_log_holds_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text('{"content": "a", "summary": "b"}\nnot json\n', encoding="utf-8")
    (data / "dev.json").write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    args = [*FAST, f"dataset.dir={data}", "hydra.run.dir=run", f"dataset.cache_dir={tmp_path / 'c'}"]
    result = script("train.py", *args, cwd=tmp_path)
    line = one_line(result.stderr)
    assert result.returncode == 1 and line.startswith(f"train.py: {data / 'train.json'}:2: not valid JSON"), line
    assert line.removeprefix("train.py: ") in (tmp_path / "run" / "train.log").read_text()  # not an empty log
    full = script("train.py", *args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert "Traceback" in full.stderr and "DataError" in full.stderr


@pytest.mark.parametrize(
    ("name", "override", "expected"),
    [
        ("train.py", "max_steps=abc", "max_steps='abc': must be a whole number >= 1"),
        ("train.py", "objective=rouge", "objective=rouge: unknown; choose one of eval_loss, rouge-1"),
        ("evaluate.py", "max_samples=abc", "max_samples='abc': must be null or a whole number >= 1"),
        ("evaluate.py", "max_samples=3", "give exactly one of checkpoint=PATH or predictions=PATH"),
        ("train.py", "model.path=/nope", "model.path=/nope: no such directory. Point model.path at a local model"),
        ("train.py", "dataset.dir=/nope", "/nope/train.json: file not found. Check dataset.dir"),
        ("train.py", "dataset.validation_file=.", "synthetic_adgen: is a directory, not a file. dataset.dir"),
    ],
)
def test_a_bad_setting_is_refused_before_torch_loads(tmp_path, name, override, expected):
    """torch and transformers take seconds to import: a setting that cannot work is refused before they load."""
    probe = "import atexit, runpy, sys; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules)); "
    probe += "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    done = run_cli(sys.executable, "-c", probe, str(REPO / name), override, cwd=tmp_path, timeout=120)
    assert done.returncode in (1, 2) and expected in one_line(done.stderr)
    assert "torch loaded: False" in done.stdout


def test_a_key_typo_lists_the_groups_keys_and_leaves_no_run_folder(tmp_path):
    result = script("train.py", "prefix.lenght=8", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "train.py: prefix.lenght: no such key; did you mean prefix.length? the prefix group takes dropout, init, "
        "init_text, length, projection, projection_hidden_size"
    )
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made the run folder
    bad = script("evaluate.py", "max_samples=abc", "predictions=x.jsonl", cwd=tmp_path)
    assert bad.returncode == 2
    assert "evaluate.py: 1 bad setting(s); fix them on the command line: max_samples='abc': must be null or a " in (
        one_line(bad.stderr)
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("generation.top_p=abc", "generation.top_p='abc': must be a number in (0, 1]"),
        ("port=abc", "port='abc': must be null or a port number (1-65535)"),
        ("+generation.max_new_token=5", "generation.max_new_token: no such key; did you mean generation.max_new_"),
        ("generation.max_new_token=5", "generation.max_new_token: no such key; did you mean generation.max_new_"),
    ],
)
@pytest.mark.parametrize("front_end", ["chat", "web", "serve"])
def test_front_end_settings_are_one_line(front_end, override, expected, capsys):
    assert cli([front_end, override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_chat_names_the_checkpoint_in_a_run_folder_and_a_missing_path(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (3, 12, 6):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    assert cli(["chat", f"checkpoint={run}"]) == 1
    newest = run / "checkpoint-12"
    assert f"a run folder, not a checkpoint; its newest checkpoint is {newest}" in capsys.readouterr().err
    assert cli(["chat", f"checkpoint={tmp_path / 'nowhere'}"]) == 1
    assert f"{tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_predictions_file_prints_its_metrics(tmp_path, caplog):
    predictions = tmp_path / "generated_predictions.jsonl"
    rows = [{"labels": "红色的连衣裙", "predict": "红色连衣裙"}, {"labels": "白色衬衫", "predict": "白色的衬衫"}]
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="ptune"):
        evaluate_command(compose_config("evaluate", f"predictions={predictions}", "metric_processes=1"))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert f"{predictions}: {{'rouge-1': {written['rouge-1']}, " in caplog.text and "'rows': 2}" in caplog.text


@contextlib.contextmanager
def mounted(folder: Path, options: str):
    """A tmpfs at ``folder`` (root only: a read-only or a tiny file system, as a user meets them)."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only or full file system needs a mount (root)")
def test_a_read_only_run_folder_and_a_full_disk_name_the_path(tmp_path, fast_cfg):
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        result = script("train.py", f"hydra.run.dir={ro / 'run'}", cwd=tmp_path)
        handler = {"file": {"class": "logging.FileHandler", "filename": str(ro / "train.log")}}
        with pytest.raises(ValueError, match="Unable to configure handler 'file'") as logging_failed:
            logging.config.dictConfig({"version": 1, "handlers": handler})  # as Hydra meets an unwritable run
    assert error_line(logging_failed.value, "train").startswith(f"{ro / 'train.log'}: Read-only file system")
    line = one_line(result.stderr)
    assert result.returncode == 1 and line.startswith(f"train.py: {ro / 'run'}: Read-only file system"), line
    with mounted(tmp_path / "full", "size=24k") as full, pytest.raises(OSError) as info:
        train(fast_cfg("max_steps=3", "save_steps=3"), str(full / "run"))
    assert str(full / "run") in str(info.value.filename) and "No space left" in str(info.value)
