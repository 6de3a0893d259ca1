"""End to end on the built-in default: learning, frozen base, checkpoints, resume, sweeps, torchrun, bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from ptune.checkpoints.config_checks import ConfigError
from ptune.checkpoints.format import META_FILE, PREFIX_FILE, build_prefix, load_prefix_weights, read_metadata
from ptune.data.reading import DataError
from ptune.frontends.common import compose_frontend_config, load_model
from ptune.inference.loading import load_checkpoint
from ptune.model.base import config_sha256
from ptune.model.prefix import PrefixShape
from ptune.training.guards import DivergenceError, LossGuard
from ptune.training.recipe import build_trainer, train
from ptune.training.trainer import PrefixTrainer
from tests.conftest import FAST, REPO, SHARED, TINY_GLM, compose_train


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


def test_default_run_learns_and_leaves_the_base_untouched(tmp_path):
    """`python train.py` as shipped: the eval loss falls by at least 20% from the untrained prefix."""
    cfg = compose_train("trainer.report_to=[none]", cache_dir=tmp_path / "cache")
    trainer = build_trainer(cfg, str(tmp_path / "run"))
    base_before = {k: v.clone() for k, v in trainer.model.base.state_dict().items()}
    trainer.train()
    trainer.save_state()
    evals = [h["eval_loss"] for h in history(tmp_path / "run") if "eval_loss" in h]
    assert history(tmp_path / "run")[0]["step"] == 0 and "eval_loss" in history(tmp_path / "run")[0]
    assert evals[-1] <= 0.8 * evals[0], evals
    base_after = trainer.model.base.state_dict()
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


def test_checkpoint_holds_the_prefix_and_what_rebuilds_it(fast_cfg, tmp_path):
    run = tmp_path / "run"
    loss = train(fast_cfg("prefix.projection=true", "prefix.projection_hidden_size=8"), str(run))
    assert loss == pytest.approx([h for h in history(run) if "eval_loss" in h][-1]["eval_loss"])
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-6"]
    assert not (run / ".staging").exists()
    ckpt = run / "checkpoint-6"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted(
        [
            PREFIX_FILE,
            META_FILE,
            "optimizer.safetensors",
            "optimizer.json",
            "scheduler.json",
            "rng_state.safetensors",
            "rng_state.json",
            "trainer_state.json",
        ]
    )
    # only the prefix, never base weights: embedding + both projection layers
    saved = load_file(str(ckpt / PREFIX_FILE))
    assert set(saved) == {"embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"}
    meta = read_metadata(ckpt)
    assert set(meta["files"]) == set(names) - {META_FILE}  # the SHA256 of every other file
    assert meta["base_model"] == {
        "path": str(TINY_GLM.resolve()),
        "config_sha256": config_sha256(TINY_GLM),
        "config": json.loads((TINY_GLM / "config.json").read_text()),
        "quantization": None,
    }
    assert meta["prefix"]["length"] == 16 and meta["prefix"]["projection"] is True
    assert meta["config"]["dataset"]["max_target_length"] == 128
    assert meta["config"]["model"]["prompt"]["kind"] == "chatglm2"
    # round trip: rebuilt from the metadata alone, the weights load and equal the saved ones
    p = meta["prefix"]
    rebuilt = build_prefix(PrefixShape(**p["shape"]), p, hidden_size=0)
    load_prefix_weights(ckpt, rebuilt)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved.items())
    # the run folder: resolved config, log with the loss lines, TensorBoard off here, trainer state
    assert (run / "trainer_state.json").exists()


def test_checkpoint_of_another_prefix_is_refused(fast_cfg, tmp_path):
    train(fast_cfg(), str(tmp_path / "run"))
    other = build_prefix(PrefixShape(2, 2, 16), {"length": 8, "projection": False}, hidden_size=64)
    with pytest.raises(ValueError, match="does not fit"):
        load_prefix_weights(tmp_path / "run" / "checkpoint-6", other)
    with pytest.raises(FileNotFoundError, match="not a ptune checkpoint"):
        load_prefix_weights(tmp_path, other)


def test_resume_continues_exactly(fast_cfg, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(fast_cfg(), str(full))
    train(fast_cfg(f"resume={full / 'checkpoint-3'}"), str(resumed))

    def losses_after_3(run):
        return {h["step"]: h["loss"] for h in history(run) if "loss" in h and h["step"] > 3}

    assert sorted(losses_after_3(full)) == [4, 5, 6]
    assert losses_after_3(resumed) == pytest.approx(losses_after_3(full), rel=1e-6, abs=1e-7)
    assert load_file(str(full / "checkpoint-6" / PREFIX_FILE)).keys() == {"embedding.weight"}
    a = load_file(str(full / "checkpoint-6" / PREFIX_FILE))["embedding.weight"]
    b = load_file(str(resumed / "checkpoint-6" / PREFIX_FILE))["embedding.weight"]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_resume_auto_picks_the_newest_checkpoint_of_the_run(fast_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(fast_cfg("resume=auto"), str(run))  # nothing to resume: a fresh start
    shutil.rmtree(run / "checkpoint-6")  # as if killed after step 3's save
    loaded = []
    original = PrefixTrainer._load_optimizer_and_scheduler

    def spy(self, checkpoint):
        loaded.append(checkpoint)
        return original(self, checkpoint)

    monkeypatch.setattr(PrefixTrainer, "_load_optimizer_and_scheduler", spy)
    train(fast_cfg("resume=auto"), str(run))
    assert loaded == [str(run / "checkpoint-3")]
    assert [h["step"] for h in history(run) if "loss" in h] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train(fast_cfg(f"resume={tmp_path / 'nowhere'}"), str(tmp_path / "other"))


def test_bad_data_line_names_file_and_line(fast_cfg, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', "utf-8")
    (data / "dev.json").write_text('{"prompt": "a", "response": "b"}\n', "utf-8")
    with pytest.raises(DataError, match=r"train\.json:2"):
        train(fast_cfg("dataset=jsonl", f"dataset.dir={data}"), str(tmp_path / "run"))


def test_missing_model_folder_says_which_key(fast_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*no such directory"):
        train(fast_cfg(f"model.path={tmp_path / 'nope'}"), str(tmp_path / "run"))


def test_multi_turn_data_trains(fast_cfg, tmp_path):
    loss = train(fast_cfg("dataset=synthetic_chat", "max_steps=2", "save_steps=2"), str(tmp_path / "run"))
    assert loss == loss  # a number, not NaN
    assert (tmp_path / "run" / "checkpoint-2" / PREFIX_FILE).exists()


def test_other_architecture_trains(fast_cfg, tmp_path, llama_dir):
    run = tmp_path / "run"
    train(fast_cfg(f"model.path={llama_dir}", "max_steps=3"), str(run))
    evals = [h["eval_loss"] for h in history(run) if "eval_loss" in h]
    assert evals[-1] < evals[0]


@pytest.mark.skipif(not (SHARED / "data/advertisegen/train_5k.json").exists(), reason="../shared is absent")
def test_a_few_steps_on_real_advertisegen_lines(fast_cfg, tmp_path):
    run = tmp_path / "run"
    cfg = fast_cfg(
        "dataset=advertisegen",
        f"dataset.dir={SHARED / 'data/advertisegen'}",
        "dataset.train_file=train_5k.json",
        "max_steps=3",
    )
    train(cfg, str(run))
    losses = [h["loss"] for h in history(run) if "loss" in h]
    assert len(losses) == 3 and all(x == x for x in losses)


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command in its own process group; past ``timeout`` the whole group is killed (torchrun's ranks too,
    which would otherwise keep the output pipes open and the test waiting forever)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    with subprocess.Popen(
        [*args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(args[:3])} ... ran past {timeout} s and was killed:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_torchrun_ranks_share_one_run_folder(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    result = run_cli(
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        *FAST,
        "max_steps=2",
        "save_steps=2",
        "torch_threads=1",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    errors = [line for line in result.stderr.splitlines() if "rror" in line or "terminate" in line]
    assert result.returncode == 0, "\n".join(errors[:20]) + result.stderr[-2000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    assert (runs[0] / "checkpoint-2" / PREFIX_FILE).exists()
    state = json.loads((runs[0] / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert {p.name for p in (runs[0] / "checkpoint-2").glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors",
        "rng_state_1.safetensors",
    }


def test_help_lists_the_config_groups(tmp_path):
    result = run_cli(sys.executable, str(REPO / "train.py"), "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for group in ("dataset:", "model:", "prefix:", "trainer:", "experiment:"):
        assert group in result.stdout


def test_bf16_base_with_fp32_prefix(fast_cfg, tmp_path):
    trainer = build_trainer(fast_cfg("model.dtype=bfloat16", "max_steps=3"), str(tmp_path / "run"))
    assert {p.dtype for p in trainer.model.base.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.prefix.parameters()} == {torch.float32}
    before = trainer.model.prefix.embedding.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(x == x for x in losses)
    assert not torch.equal(before, trainer.model.prefix.embedding.weight)  # the fp32 prefix trained


def test_checkpoints_are_durable_with_the_users_file_mode(fast_cfg, tmp_path, monkeypatch):
    """Every checkpoint file is fsynced before its folder is renamed into place, the run folder after; modes follow
    the umask like any file the user writes."""
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    run = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        train(fast_cfg("max_steps=3"), str(run))
    finally:
        os.umask(previous)
    files = sorted(p.name for p in (run / "checkpoint-3").iterdir())
    assert {name: (run / "checkpoint-3" / name).stat().st_mode & 0o777 for name in files} == dict.fromkeys(files, 0o640)
    assert set(synced) >= {str(run / ".staging" / "checkpoint-3" / name) for name in files}
    assert str(run) in synced[synced.index(str(run / ".staging" / "checkpoint-3")) :]  # the rename, flushed


def test_a_save_recovers_from_a_kill_between_its_renames(fast_cfg, tmp_path):
    """A kill between the two renames of a re-save leaves .staging/checkpoint-N.old; the next save of N must work."""
    run = tmp_path / "run"
    train(fast_cfg(), str(run))
    leftover = run / ".staging" / "checkpoint-6.old"
    leftover.mkdir(parents=True)
    (leftover / PREFIX_FILE).write_bytes(b"old")
    train(fast_cfg(f"resume={run / 'checkpoint-3'}"), str(run))  # saves checkpoint-6 again
    assert not (run / ".staging").exists()
    assert load_file(str(run / "checkpoint-6" / PREFIX_FILE)).keys() == {"embedding.weight"}


def test_resume_with_changed_settings_is_refused_and_a_new_schedule_is_offered(fast_cfg, tmp_path, caplog):
    full = tmp_path / "full"
    train(fast_cfg(), str(full))
    checkpoint = full / "checkpoint-3"
    with pytest.raises(ConfigError, match=r"learning_rate: 0\.02 -> 0\.5\..*learning_rate=0\.02.*init_from=") as info:
        train(fast_cfg("learning_rate=0.5", f"resume={checkpoint}"), str(tmp_path / "lr"))
    assert "trainer.learning_rate" not in str(info.value)  # the knob is named, not its copy in the trainer group
    with pytest.raises(ConfigError, match=r"max_steps: 6 -> 12"):
        train(fast_cfg("max_steps=12", f"resume={checkpoint}"), str(tmp_path / "longer"))
    assert not (tmp_path / "lr").exists() and not (tmp_path / "longer").exists()  # refused before anything ran

    # what may change does not stop a resume; the log names the checkpoint; one eval entry per step
    resumed = tmp_path / "resumed"
    with caplog.at_level(logging.INFO, logger="ptune"):
        train(fast_cfg(f"resume={checkpoint}", "trainer.logging_steps=2", "torch_threads=1"), str(resumed))
    assert f"resuming from {checkpoint}" in caplog.text
    assert [h["step"] for h in history(resumed) if "eval_loss" in h] == [0, 3, 6]

    # a new schedule from the prefix: the first eval equals the last of the run it starts from
    fresh = tmp_path / "fresh"
    train(fast_cfg("learning_rate=0.5", "max_steps=3", f"init_from={full / 'checkpoint-6'}"), str(fresh))
    first = [h for h in history(fresh) if "eval_loss" in h][0]
    last = [h for h in history(full) if "eval_loss" in h][-1]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    assert [h["learning_rate"] for h in history(fresh) if "loss" in h][0] == pytest.approx(0.5)


def test_a_changed_base_model_is_refused_naming_the_keys(fast_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    train(fast_cfg(), str(run))
    checkpoint = run / "checkpoint-3"
    other = tmp_path / "other-base"
    shutil.copytree(TINY_GLM, other)
    config = json.loads((other / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500000.0
    (other / "config.json").write_text(json.dumps(config))
    expected = r"rope_parameters\.rope_theta: 10000\.0 in the checkpoint's, 500000\.0 here.*allow_base_mismatch=true"
    with pytest.raises(ConfigError, match=expected):
        train(fast_cfg(f"model.path={other}", f"resume={checkpoint}"), str(tmp_path / "resumed"))
    with pytest.raises(ConfigError, match=expected):
        load_checkpoint(checkpoint, base_path=str(other))
    with pytest.raises(ConfigError, match=expected):
        load_model(compose_frontend_config([f"checkpoint={checkpoint}", f"model.path={other}"]))
    with caplog.at_level(logging.WARNING, logger="ptune"):
        assert load_checkpoint(checkpoint, base_path=str(other), allow_base_mismatch=True).base_path == str(other)
    assert "rope_theta" in caplog.text
    resumed = tmp_path / "resumed"
    train(fast_cfg(f"model.path={other}", f"resume={checkpoint}", "allow_base_mismatch=true"), str(resumed))
    assert (resumed / "checkpoint-6" / PREFIX_FILE).exists()
    # a checkpoint from before the config was recorded: still refused, without the keys
    meta = read_metadata(checkpoint)
    del meta["base_model"]["config"]
    (checkpoint / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="records only its hash"):
        load_checkpoint(checkpoint, base_path=str(other))


def test_packed_training_follows_the_unpacked_loss_curve(fast_cfg, tmp_path):
    """dataset.pack_length: the same rows per step (micro-batch 8 x 1, the same sampler), packed into sequences of
    256 tokens instead of padded to the longest row: the same training losses step by step, and they fall."""
    settings = ["trainer.per_device_train_batch_size=8", "trainer.gradient_accumulation_steps=1", "max_steps=8"]
    curves = {}
    for pack in ("null", "256"):
        run = tmp_path / f"run-{pack}"
        trainer = build_trainer(fast_cfg(*settings, f"dataset.pack_length={pack}"), str(run))
        trainer.train()
        curves[pack] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if pack == "256":
            batch = next(iter(trainer.get_train_dataloader()))
            assert "position_ids" in batch and batch["input_ids"].shape[1] == 256
            assert batch["input_ids"].shape[0] < 8  # several rows per sequence
    assert len(curves["256"]) == 8
    assert curves["256"] == pytest.approx(curves["null"], abs=2e-4)
    assert curves["256"][-1] < curves["256"][0]


def test_non_finite_loss_stops_the_run_before_its_checkpoint(fast_cfg, tmp_path):
    """The prefix turns NaN after step 2 (as after an exploding update): the run stops at step 3 with the step and
    the last finite loss, and checkpoint-3 (save_steps=3) is never written."""
    trainer = build_trainer(fast_cfg(), str(tmp_path / "run"))

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    trainer.model.prefix.embedding.weight.fill_(float("nan"))

    trainer.callback_handler.callbacks.insert(0, Poison())  # before the guard: it sees step 3's loss
    with pytest.raises(DivergenceError, match=r"step 3: the loss is nan \(the last finite loss was \d+\.\d+ at step 2"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-3").exists()
    assert trainer.state.global_step == 3


def test_loss_far_above_its_start_warns(caplog):
    model = torch.nn.Linear(1, 1)
    guard = LossGuard(model)
    state = SimpleNamespace(global_step=0)
    args = SimpleNamespace(learning_rate=0.5)
    with caplog.at_level("WARNING", logger="ptune.training.guards"):
        for step, loss in enumerate([2.0, 1.5, 3.9, 4.5, 5.0], start=1):
            state.global_step = step
            guard._record(model.train(), (), SimpleNamespace(loss=torch.tensor(loss)))
            guard.on_step_end(args, state, None)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "the training loss rose from 2.0000 (first step) to 4.5000 at step 4, more than 2x: the learning rate may be "
        "too high (learning_rate=0.5)"
    ]


def test_max_target_length_zero_is_refused(fast_cfg, tmp_path):
    with pytest.raises(ValueError, match="dataset.max_target_length=0"):
        build_trainer(fast_cfg("dataset.max_target_length=0"), str(tmp_path / "run"))


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_disable_tqdm_takes_the_step_bar_away_and_each_log_is_shown_once(fast_cfg, tmp_path, capfd, disable_tqdm):
    train(fast_cfg(f"+trainer.disable_tqdm={str(disable_tqdm).lower()}"), str(tmp_path / "run"))
    out, err = capfd.readouterr()
    assert ("| 6/6 [" in err) is not disable_tqdm  # the bar over max_steps=6
    assert "{'loss'" not in out + err  # log dicts go to the ptune logger only, never printed by a callback
