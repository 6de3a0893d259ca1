"""Hydra glue: config resolvers, the run directory and logging. Imported by the entry points before ``@hydra.main``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from ptune.training.objective import objective_direction
from ptune.utils.paths import REPO_ROOT


def _launcher_start_time() -> float | None:
    """Start time of the parent process, when we were started by ``torchrun`` (else None).

    Each rank resolves ``${now:...}`` on its own and may land a second apart, splitting one run into two folders.
    All ranks of a node share the torchrun agent as their parent, so its start time names the run once for all.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_stamp(fmt: str = "%Y-%m-%d/%H-%M-%S") -> str:
    """``${ptune_stamp:}``: like ``${now:}``, but the same for every rank of one torchrun launch."""
    started = _launcher_start_time()
    return time.strftime(fmt, time.localtime(started if started is not None else time.time()))


def sqlite_url(path: str) -> str:
    """``${ptune_sqlite:PATH}``: an SQLAlchemy URL for a sqlite file, its folder made (sqlite will not make it)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def register_resolvers() -> None:
    """``${ptune_root:}``, ``${ptune_stamp:}``, ``${ptune_sqlite:PATH}`` and ``${ptune_direction:OBJECTIVE}``
    (minimize or maximize, for the Optuna sweeper).

    The stamp is cached (``use_cache``): resolved once per launch, not once per sweep job. Hydra copies the
    resolver cache of the multirun's config into each job's config, so every job of one ``-m`` launch names the
    same ``multirun/DATE/TIME`` (as Hydra's own ``${now:}`` does); uncached, each job would open a folder of its own.
    """
    if not OmegaConf.has_resolver("ptune_root"):
        OmegaConf.register_new_resolver("ptune_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("ptune_stamp"):
        OmegaConf.register_new_resolver("ptune_stamp", run_stamp, use_cache=True)
    for name, fn in {"ptune_sqlite": sqlite_url, "ptune_direction": objective_direction}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def run_output_dir() -> str:
    """The Hydra run (or sweep job) directory: the trainer writes its checkpoints and logs here."""
    return HydraConfig.get().runtime.output_dir


def route_library_logs() -> None:
    """Send transformers' warnings through the root logger, so they reach Hydra's log file, not just stderr."""
    import datasets  # imported here, not at the top: the entry points check their command line before these load
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.disable_progress_bars()  # per-shard save bars; ptune logs one line per split instead
    logging.getLogger("ptune").setLevel(logging.INFO)


register_resolvers()
