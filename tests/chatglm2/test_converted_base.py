"""A checkpoint trained on an original ChatGLM2 folder fits that folder's ``ptune convert`` output: the base is
compared as the model it loads to, and a real change of it is still refused."""

from __future__ import annotations

import json

import pytest

from ptune.checkpoints.config_checks import ConfigError
from ptune.cli import main as cli
from ptune.inference.loading import load_checkpoint
from ptune.training.recipe import train
from tests.chatglm2.test_conversion import original  # noqa: F401  (the module's fixture: a small original folder)
from tests.conftest import FAST, compose_train


def test_an_original_folder_and_its_conversion_are_one_base(original, tmp_path):  # noqa: F811
    folder, _, _ = original
    run = tmp_path / "run"
    settings = [*FAST, "model=chatglm2-6b", "model.dtype=float32", "max_steps=2", "save_steps=1"]
    train(compose_train(*settings, f"model.path={folder}", cache_dir=tmp_path / "cache"), str(run))
    native = tmp_path / "native"
    assert cli(["convert", str(folder), str(native)]) == 0
    assert load_checkpoint(run / "checkpoint-2", base_path=str(native)).base_path == str(native)
    resumed = compose_train(*settings, f"model.path={native}", f"resume={run / 'checkpoint-1'}", cache_dir=tmp_path)
    train(resumed, str(tmp_path / "resumed"))  # training goes on on the converted folder
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()
    config = json.loads((native / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500000.0  # another model: still refused, naming the key
    (native / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"rope_parameters\.rope_theta: 10000\.0 in the checkpoint's, 500000\.0 here"):
        load_checkpoint(run / "checkpoint-2", base_path=str(native))
