"""The real Hydra config: every option composes, the issue's command line works, every key is documented."""

from __future__ import annotations

import re
import time

import pytest
from omegaconf import OmegaConf

from ptune.checkpoints.config_checks import ConfigError, check_frontend_config, check_train_config
from ptune.frontends.common import compose_frontend_config
from ptune.training import hydra_setup
from ptune.training.recipe import train, training_arguments
from tests.conftest import REPO, compose_train

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    for group in ("dataset", "model", "prefix", "trainer", "experiment")
}
REQUIRED = {"dataset.dir": "/data/AdvertiseGen", "model.path": "/models/m"}


def fill_required(*overrides: str) -> list[str]:
    return [*overrides, *(f"{k}={v}" for k, v in REQUIRED.items())]


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group, options in GROUP_OPTIONS.items() for option in options]
)
def test_every_config_option_composes_and_builds_trainer_arguments(override, tmp_path):
    cfg = compose_train(*fill_required(override))
    check_train_config(cfg)  # every shipped option passes the checks
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["dataset"]["prompt_column"] and resolved["model"]["prompt"]["kind"]
    args = training_arguments(cfg, str(tmp_path))
    assert args.max_steps == cfg.max_steps and args.output_dir == str(tmp_path)


def test_the_issue_command_line(tmp_path):
    cfg = compose_train(
        "max_steps=60",
        "save_steps=20",
        "learning_rate=2e-2",
        "prefix.length=128",
        "model.path=/models/chatglm2-6b",
        "dataset=advertisegen",
        "dataset.dir=/data/AdvertiseGen",
    )
    args = training_arguments(cfg, str(tmp_path))
    assert (args.max_steps, args.save_steps, args.eval_steps, args.learning_rate) == (60, 20, 20, 2e-2)
    assert cfg.prefix.length == 128 and cfg.model.path == "/models/chatglm2-6b"
    assert cfg.dataset.dir == "/data/AdvertiseGen" and cfg.dataset.prompt_column == "content"


def test_reference_recipe_preset(tmp_path):
    cfg = compose_train(*fill_required("experiment=adgen_chatglm2"))
    args = training_arguments(cfg, str(tmp_path))
    assert cfg.prefix.length == 128 and cfg.model.prompt.kind == "chatglm2"
    assert (cfg.dataset.max_source_length, cfg.dataset.max_target_length) == (64, 128)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 16)
    assert (args.max_steps, args.save_steps, args.logging_steps, args.learning_rate) == (3000, 1000, 10, 2e-2)


def test_required_keys_are_marked_required():
    cfg = compose_train("dataset=advertisegen")
    assert OmegaConf.is_missing(cfg.dataset, "dir")


def test_every_key_has_a_comment():
    """Every knob of train.yaml and the group defaults says what it does (presets and hydra's own keys aside)."""
    key_line = re.compile(r"^\s*[A-Za-z_][\w.]*:\s*[^\s#]")
    files = [p for p in (REPO / "conf").glob("*/*.yaml") if p.parent.name != "experiment"]
    for path in [REPO / "conf" / "train.yaml", *files]:
        text = path.read_text(encoding="utf-8").split("\nhydra:")[0]
        for number, line in enumerate(text.splitlines(), 1):
            if key_line.match(line) and "#" not in line:
                pytest.fail(f"{path.relative_to(REPO)}:{number}: no comment on {line.strip()!r}")


def test_run_folder_is_fixed_once_per_torchrun_launch(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    first = hydra_setup.run_stamp("%H-%M-%S")
    monkeypatch.setattr(time, "time", lambda: 86400.0 * 365 * 100)
    assert hydra_setup.run_stamp("%Y") != first  # plain runs: the current time
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    launcher = hydra_setup._launcher_start_time()
    assert launcher is not None and launcher < 86400.0 * 365 * 100
    assert hydra_setup.run_stamp("%Y-%m-%d %H:%M:%S") == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(launcher))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("max_steps=abc", "max_steps='abc': must be a whole number >= 1"),
        ("save_steps=0", "save_steps=0: must be a whole number >= 1"),
        ("learning_rate=fast", "learning_rate='fast': must be a number > 0"),
        ("seed=1.5", "seed=1.5: must be a whole number"),
        ("max_train_samples=all", "max_train_samples='all': must be null or a whole number >= 1"),
        ("allow_base_mismatch=maybe", "allow_base_mismatch='maybe': must be true or false"),
        ("+model.flash_attention=true", "model.flash_attention: unknown key; the model group takes dtype, path"),
        ("+dataset.max_len=64", "dataset.max_len: unknown key; the dataset group takes cache_dir, dir"),
        ("+prefix.lenght=8", "prefix.lenght: unknown key"),
        ("+trainer.lerning_rate=1", "trainer.lerning_rate: not a Seq2SeqTrainingArguments field"),
    ],
)
def test_bad_settings_fail_before_anything_is_loaded(override, named, tmp_path):
    """The data folder does not exist: the config check must come first and name the key."""
    cfg = compose_train(override, f"dataset.dir={tmp_path / 'no-data'}", f"model.path={tmp_path / 'no-model'}")
    with pytest.raises(ConfigError, match="fix them on the command line") as info:
        train(cfg, str(tmp_path / "run"))
    assert named in str(info.value)
    assert not (tmp_path / "run").exists()


def test_all_bad_settings_in_one_message():
    cfg = compose_train("max_steps=abc", "learning_rate=-1", "+model.x=1", "+model.prompt.y=2")
    with pytest.raises(ConfigError, match="4 bad setting") as info:
        check_train_config(cfg)
    assert "model.x:" in str(info.value) and "model.prompt.y:" in str(info.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("generation.max_new_tokens=abc", "generation.max_new_tokens='abc': must be a whole number >= 1"),
        ("generation.do_sample=yes", "generation.do_sample='yes': must be true or false"),
        ("generation.top_p=2", "generation.top_p=2: must be a number in (0, 1]"),
        ("port=http", "port='http': must be null or a port number"),
        ("max_new_tokens_limit=-5", "max_new_tokens_limit=-5: must be a whole number >= 1"),
        ("model.dtype=fp8", "model.dtype='fp8': must be null or one of float32, bfloat16, float16"),
    ],
)
def test_front_end_settings_are_checked_when_composed(override, named):
    """ptune chat / web / serve compose their config here: a bad value stops them at start, not every request."""
    with pytest.raises(ConfigError) as info:
        compose_frontend_config([override])
    assert named in str(info.value)
    check_frontend_config(compose_frontend_config([]))  # the shipped defaults pass
