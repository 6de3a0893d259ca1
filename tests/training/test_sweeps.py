"""Sweeps at scale: one folder per multirun, Hydra's joblib / submitit / ray launchers and Optuna sweeper (the
`sweep` extra), thread caps, the objective a sweep optimises, the sweep report, and bad plugin or objective names."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

import ptune.training.recipe as training
from ptune.checkpoints.format import PREFIX_FILE, read_metadata
from ptune.evaluation.report import PLOT_FILE, SWEEP_NAME
from ptune.evaluation.scoring import evaluate_target
from ptune.training import sweeps
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, compose_config, compose_train
from tests.training.test_recipe import run_cli

# a few steps, a few rows: each job trains in a couple of seconds
TINY = [o for o in FAST if not o.startswith(("max_steps", "save_steps", "max_train_samples"))]
TINY += ["max_steps=2", "save_steps=2", "max_train_samples=16", "max_eval_samples=8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tokenised-data cache for the module's runs: the data is tokenised once."""
    return tmp_path_factory.mktemp("cache")


def sweep_cli(tmp_path: Path, cache: Path, *args: str, env_extra: dict | None = None, timeout: int = 300):
    """``python train.py -m ...`` launched in ``tmp_path`` (so multirun/ lands there), sweep dir NOT fixed."""
    return run_cli(
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        *TINY,
        f"dataset.cache_dir={cache}",
        *args,
        cwd=tmp_path,
        env_extra=env_extra,
        timeout=timeout,
    )


def the_sweep_folder(tmp_path: Path) -> Path:
    folders = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders  # one launch, one multirun/DATE/TIME
    return folders[0]


def jobs_of(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())


def test_default_sweep_is_one_folder_and_its_report(tmp_path, cache):
    """`train.py -m prefix.length=2,4 learning_rate=1e-2,2e-2` without hydra.sweep.dir: one folder, four jobs;
    `evaluate.py checkpoint=<sweep>` ranks them with only the swept keys named."""
    result = sweep_cli(tmp_path, cache, "prefix.length=2,4", "learning_rate=1e-2,2e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = the_sweep_folder(tmp_path)
    assert jobs_of(sweep) == ["0", "1", "2", "3"]
    seen = {
        (m["prefix"]["length"], m["config"]["learning_rate"])
        for m in (read_metadata(sweep / job / "checkpoint-2") for job in "0123")
    }
    assert seen == {(2, 1e-2), (2, 2e-2), (4, 1e-2), (4, 2e-2)}

    rows = evaluate_target(
        compose_config("evaluate", f"checkpoint={sweep}", "max_samples=4", "batch_size=4", "metric_processes=1")
    )
    assert len(rows) == 4
    (results,) = sweep.glob("eval-*")  # max_samples: the results of these options, in their own folder
    table = (results / f"{SWEEP_NAME}.md").read_text().splitlines()
    assert table[0].startswith("| rank | run | prefix.length | learning_rate | step | rouge-1")
    assert "max_steps" not in table[0]  # the same in every job: not a swept parameter
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:6]]
    ranked = [float(c[7]) for c in cells]  # the rouge-l column
    assert ranked == sorted(ranked, reverse=True) and sorted(ranked) == sorted(r["rouge-l"] for r in rows)
    best = next(r for r in rows if r["run"] == cells[0][1])
    note = f"Best by rouge-l: run {best['run']}, rouge-l {best['rouge-l']}, checkpoint {best['checkpoint']}"
    assert table[-1] == note
    assert best["checkpoint"] == str(sweep / best["run"] / "checkpoint-2")
    assert (results / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_joblib_runs_two_jobs_side_by_side_with_capped_threads(tmp_path, cache):
    result = sweep_cli(tmp_path, cache, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "prefix.length=2,4")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = the_sweep_folder(tmp_path)
    assert jobs_of(sweep) == ["0", "1"]
    cores, processes = sweeps.usable_cores(), set()
    for job in "01":
        assert (sweep / job / "checkpoint-2" / PREFIX_FILE).exists()
        log = (sweep / job / "train.log").read_text()
        assert f"torch threads: {max(1, cores // 2)} ({cores} cores / hydra.launcher.n_jobs=2" in log
        processes |= set(re.findall(r"^\[.*\] - torch threads: .* in process (\d+)$", log, flags=re.M))
    # two worker processes of joblib's pool, one job each (not the overlap of their log times: a job trains for
    # about a second, and under load one worker's imports can end that long after the other's)
    assert len(processes) == 2, processes


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    HydraConfig.instance().cfg = None


def multirun_hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    return cfg


def test_thread_cap_follows_the_launcher_unless_torch_threads_is_set(restore_threads):
    joblib = multirun_hydra_config("hydra/launcher=joblib", "hydra.launcher.n_jobs=2").hydra.launcher
    assert sweeps.parallel_thread_cap(joblib, 16)[0] == 8
    joblib.n_jobs = -1  # joblib's default: one job per core
    assert sweeps.parallel_thread_cap(joblib, 16)[0] == 1
    submitit = multirun_hydra_config("hydra/launcher=slurm_gpu").hydra.launcher
    assert sweeps.parallel_thread_cap(submitit, 64)[0] == 8  # the preset's cpus_per_task
    local = multirun_hydra_config("hydra/launcher=submitit_local").hydra.launcher  # cpus_per_task null
    threads, why = sweeps.parallel_thread_cap(local, 16)
    assert threads == 1 and "cpus_per_task is null" in why  # issue 19.18: capped like joblib's n_jobs=-1, logged
    assert sweeps.parallel_thread_cap(multirun_hydra_config().hydra.launcher, 16) is None  # basic: one at a time

    HydraConfig.instance().set_config(multirun_hydra_config("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))
    torch.set_num_threads(2)
    sweeps.cap_torch_threads(None)
    assert torch.get_num_threads() == max(1, sweeps.usable_cores() // 2)
    sweeps.cap_torch_threads(3)
    assert torch.get_num_threads() == 3


def test_submitit_local_runs_the_job(tmp_path, cache):
    submitit = ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1"]
    result = sweep_cli(tmp_path, cache, *submitit, "prefix.length=2")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = the_sweep_folder(tmp_path)
    assert jobs_of(sweep) == ["0"] and (sweep / ".submitit").is_dir()  # run through submitit's executor
    assert (sweep / "0" / "checkpoint-2" / PREFIX_FILE).exists()
    assert "torch threads: 1 (hydra.launcher.cpus_per_task=1" in (sweep / "0" / "train.log").read_text()


def test_ray_launcher_on_a_local_ray_instance(tmp_path, cache):
    """`hydra/launcher=ray` with no address: the launcher starts a local Ray instance for the sweep, as a user
    would try it before pointing `hydra.launcher.ray.init.address` at a cluster."""
    result = sweep_cli(
        tmp_path,
        cache,
        "hydra/launcher=ray",
        "+hydra.launcher.ray.init.num_cpus=2",
        "+hydra.launcher.ray.init.include_dashboard=false",
        "+hydra.launcher.ray.remote.num_cpus=1",
        "prefix.length=2,4",
        env_extra={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Started a local Ray instance" in result.stderr + result.stdout
    sweep = the_sweep_folder(tmp_path)
    assert jobs_of(sweep) == ["0", "1"]
    assert {read_metadata(sweep / job / "checkpoint-2")["prefix"]["length"] for job in "01"} == {2, 4}


def test_optuna_search_is_stored_and_resumes(tmp_path, cache):
    import optuna  # imported here: Optuna 2 warns about SQLAlchemy 2 features at import

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    search = ["hydra/sweeper=prefix_search", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=t"]
    first = sweep_cli(tmp_path, cache, *search, "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="t", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE  # objective=eval_loss
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert set(study.trials[0].params) == {"prefix.length", "learning_rate", "prefix.projection"}
    losses = [t.value for t in study.trials]
    assert all(0 < v < 10 for v in losses)  # eval losses, returned by train.py

    again = sweep_cli(tmp_path, cache, *search, "hydra.sweeper.n_trials=2")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = optuna.load_study(study_name="t", storage=storage)
    assert len(resumed.trials) == 5 and [t.value for t in resumed.trials[:3]] == losses
    stored = [t.params for t in resumed.trials[:3]]
    assert all(t.params not in stored for t in resumed.trials[3:])  # a resumed search draws new points
    assert "setup plugin alembic" not in first.stdout + again.stdout  # Optuna's storage migrations, not ours
    assert "sampler seed 3 (hydra.sweeper.sampler.seed=0 + 3 trials already in study 't')" in again.stdout


def test_resumed_study_sampler_draws_new_points_and_a_fresh_one_the_same():
    """The preset's sampler: a fresh study draws as TPESampler(seed) does; a resumed one, still in TPE's random
    start-up phase, does not replay the trials it already holds (a re-seeded TPESampler does)."""
    import optuna

    from ptune.training.study_sampler import ResumingTPESampler

    def draws(sampler, study=None, n=3):
        study = study or optuna.create_study(sampler=sampler)
        study.sampler = sampler
        study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_categorical("c", [1, 2]), n_trials=n)
        return study, [t.params for t in study.trials[-n:]]

    first = draws(ResumingTPESampler(seed=0))[1]
    assert first == draws(optuna.samplers.TPESampler(seed=0))[1]
    replayed = draws(optuna.samplers.TPESampler(seed=0), draws(ResumingTPESampler(seed=0))[0])[1]
    assert replayed == first  # what TPE seeded alone does on a resume: the stored trials again
    resumed = draws(ResumingTPESampler(seed=0), draws(ResumingTPESampler(seed=0))[0])[1]
    assert not any(params in first for params in resumed)
    assert multirun_hydra_config("hydra/sweeper=prefix_search").hydra.sweeper.sampler._target_.endswith(
        "ResumingTPESampler"
    )


def test_search_direction_follows_the_objective():
    for objective, direction in (("eval_loss", "minimize"), ("rouge-l", "maximize"), ("bleu-4", "maximize")):
        cfg = multirun_hydra_config("hydra/sweeper=prefix_search", f"objective={objective}")
        assert cfg.hydra.sweeper.direction == direction
        assert cfg.hydra.sweeper.study_name == f"prefix-{objective}"


def test_slurm_preset_names_gpus_time_and_partition():
    launcher = multirun_hydra_config("hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.timeout_min, launcher.partition) == (1, 240, "gpu")


def test_every_preset_key_has_a_comment():
    key_line = re.compile(r"^\s*[A-Za-z_][\w.]*:\s*[^\s#]")
    for path in (REPO / "conf" / "hydra").glob("*/*.yaml"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if key_line.match(line) and "#" not in line:
                pytest.fail(f"{path.relative_to(REPO)}:{number}: no comment on {line.strip()!r}")


def test_objective_rouge_l_is_what_evaluate_reports_for_those_rows(tmp_path, cache):
    run = tmp_path / "run"
    cfg = compose_train(*TINY, "max_steps=4", "objective=rouge-l", "objective_samples=6", cache_dir=cache)
    value = train(cfg, str(run))
    rows = evaluate_target(
        compose_config("evaluate", f"checkpoint={run / 'checkpoint-4'}", "max_samples=6", "metric_processes=1")
    )
    assert rows[0]["rows"] == 6 and value == rows[0]["rouge-l"]
    assert read_metadata(run / "checkpoint-4")["config"]["objective"] == "rouge-l"


def test_unknown_objective_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "build_trainer", lambda *a: pytest.fail("loaded before checking the objective"))
    with pytest.raises(ValueError, match=r"objective=rouge: unknown; choose one of eval_loss, rouge-1, rouge-2, "):
        train(compose_train(*TINY, "objective=rouge"), str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"objective_samples=0"):
        train(compose_train(*TINY, "objective=bleu-4", "objective_samples=0"), str(tmp_path / "run"))


def test_unknown_launcher_or_sweeper_lists_the_installed_ones(tmp_path):
    bad = run_cli(sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=jobllib", cwd=tmp_path, timeout=60)
    assert bad.returncode == 1
    assert "hydra/launcher=jobllib: no launcher 'jobllib' is installed. Installed: basic, joblib, ray," in bad.stderr
    assert "slurm_gpu" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli(sys.executable, str(REPO / "train.py"), "-m", "hydra/sweeper=optina", cwd=tmp_path, timeout=60)
    assert "no sweeper 'optina' is installed. Installed: basic, optuna, prefix_search." in bad.stderr
    assert not (tmp_path / "multirun").exists()


def test_missing_plugins_name_the_extra(monkeypatch):
    monkeypatch.setattr(sweeps, "installed_options", lambda group, conf: ["basic"])
    with pytest.raises(SystemExit, match=r"joblib, ray, submitit_local, submitit_slurm come with the sweep extra: "):
        sweeps.check_plugin_choices(["-m", "hydra/launcher=joblib", "prefix.length=2,4"], REPO / "conf")
    sweeps.check_plugin_choices(["-m", "prefix.length=2,4", "hydra.launcher.n_jobs=2"], REPO / "conf")  # no choice


def test_a_sweep_inside_one_torchrun_launch_is_refused_not_hung(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    sweeps.check_torchrun_sweep(["-m", "prefix.length=2", "trainer.report_to=[none]"])  # one job: fine
    with pytest.raises(SystemExit, match=r"prefix\.length=2,4: a sweep of several jobs cannot run inside one torchrun"):
        sweeps.check_torchrun_sweep(["-m", "prefix.length=2,4", "max_steps=3"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    sweeps.check_torchrun_sweep(["-m", "prefix.length=2,4"])  # no torchrun: Hydra sweeps as usual
