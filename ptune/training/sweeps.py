"""Sweeps past the basic launcher: Hydra's own launcher and sweeper plugins, named clearly when one is missing,
and torch thread caps for jobs that share a machine.

The plugins come with the ``sweep`` extra (``pip install -e '.[sweep]'``). Hydra's own message for an option it
cannot find ("Could not find 'hydra/launcher/joblib'") says neither what is installed nor what to install, so
:func:`check_plugin_choices` looks at the command line before ``@hydra.main`` and says both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

logger = logging.getLogger(__name__)

SWEEP_EXTRA = "pip install -e '.[sweep]'"
# The options the `sweep` extra's plugins add to each group (the others, e.g. `basic`, come with Hydra).
EXTRA_OPTIONS = {
    "hydra/launcher": ("joblib", "ray", "submitit_local", "submitit_slurm"),
    "hydra/sweeper": ("optuna",),
}


class PluginChoiceError(SystemExit):
    """A command line that cannot work (a plugin not installed, a sweep inside torchrun): exits with the message
    before Hydra starts."""


def installed_options(group: str, config_dir: Path) -> list[str]:
    """The options of ``hydra/launcher`` or ``hydra/sweeper``: those the installed plugins register and ptune's
    presets in ``conf/hydra/...``."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports every installed hydra_plugins package; each registers its configs in the store
    node = ConfigStore.instance().repo
    for part in group.split("/"):
        node = node.get(part, {})
    names = {name.removesuffix(".yaml") for name, entry in node.items() if not isinstance(entry, dict)}
    return sorted(names | {p.stem for p in (config_dir / group).glob("*.yaml")})


def check_plugin_choices(argv: Sequence[str], config_dir: Path) -> None:
    """Refuse ``hydra/launcher=X`` or ``hydra/sweeper=X`` when no such option is installed, listing those that
    are and the extra that brings the rest. Cheap when the command line chooses neither (nothing is imported)."""
    for arg in argv:
        key, has_value, value = arg.partition("=")
        group = key.lstrip("+")
        if not has_value or group not in EXTRA_OPTIONS:
            continue
        options = installed_options(group, config_dir)
        if value in options:
            continue
        kind = group.split("/")[1]
        message = f"{arg}: no {kind} '{value}' is installed. Installed: {', '.join(options)}."
        missing = [name for name in EXTRA_OPTIONS[group] if name not in options]
        if missing:
            message += f" {', '.join(missing)} come with the sweep extra: {SWEEP_EXTRA}"
        raise PluginChoiceError(message)


def check_torchrun_sweep(argv: Sequence[str]) -> None:
    """Refuse a sweep of several jobs inside one ``torchrun`` launch: the first job ends the ranks' process group
    and the second then waits for it forever. One job per launch works (all ranks share ``multirun/DATE/TIME/0``);
    for several, start torchrun once per job (a SLURM array does that)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not {"-m", "--multirun"} & set(argv):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    swept = [o.input_line for o in overrides if o.is_sweep_override()]
    if swept:
        raise PluginChoiceError(
            f"{' '.join(swept)}: a sweep of several jobs cannot run inside one torchrun launch (the second job would "
            "hang); run torchrun once per job, or sweep on one process per job (hydra/launcher=joblib, slurm_gpu)"
        )


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_thread_cap(launcher: DictConfig, cores: int) -> tuple[int, str] | None:
    """Torch threads for one job of a sweep whose jobs share this machine, and why; None when the launcher runs
    one job at a time (basic) or leaves threads to the scheduler.

    Jobs side by side that each use every core slow each other down several times (threads wait on each other),
    so each gets its share: cores / jobs at once under joblib; the CPUs asked for per task under submitit (what
    SLURM grants a task; submitit's local executor runs every job at once, so one thread each when it is null) and
    under Ray.
    """
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.n_jobs)
        at_once = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = every core, -2 = all but one
        return max(1, cores // at_once), f"{cores} cores / hydra.launcher.n_jobs={n_jobs}"
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task), f"hydra.launcher.cpus_per_task={launcher.cpus_per_task}"
    if target.endswith("submitit_launcher.LocalLauncher"):  # cpus_per_task null: every job starts at once, as
        # joblib's n_jobs=-1 (how many is not known inside a job), so each gets one core's share
        return 1, f"submitit_local starts every job at once and hydra.launcher.cpus_per_task is null ({cores} cores)"
    if target.endswith("RayLauncher") and launcher.ray.remote.get("num_cpus"):
        return int(launcher.ray.remote.num_cpus), f"hydra.launcher.ray.remote.num_cpus={launcher.ray.remote.num_cpus}"
    return None


def cap_torch_threads(torch_threads: int | None) -> None:
    """Set torch's CPU threads: ``torch_threads`` if given, else this job's share when sweep jobs run side by side."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if torch_threads:
        threads, why = int(torch_threads), "torch_threads"
    elif HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cap = parallel_thread_cap(HydraConfig.get().launcher, usable_cores())
        if cap is None:
            return
        threads, why = cap
        why += "; torch_threads=N sets it yourself"
    else:
        return
    torch.set_num_threads(threads)
    logger.info("torch threads: %d (%s) in process %d", threads, why, os.getpid())
