"""Hydra glue: config resolvers, the run directory, logging, and one line instead of a traceback for what the user
can fix. Imported by the entry points before ``@hydra.main``, so it imports neither torch nor transformers."""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


#: what a bad setting, file, checkpoint or disk raises (and a diverged loss); anything else is a bug and keeps its
#: traceback
USER_ERRORS = (ValueError, TypeError, OSError)
_NOT_WRITABLE = {errno.EACCES: "not writable", errno.EROFS: "on a read-only file system", errno.EPERM: "not writable"}
_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error_line(err: OSError) -> str | None:
    """A disk that is full or a folder that cannot be written, with the path and what to do (None: another error)."""
    where = err.filename or "the run folder"
    if err.errno in _FULL:
        return f"{where}: {err.strerror} (the disk is full): free space there, or write elsewhere (hydra.run.dir=...)"
    if err.errno in _NOT_WRITABLE:
        return f"{where}: {err.strerror} ({_NOT_WRITABLE[err.errno]}): run where you may write (hydra.run.dir=...)"
    return None


def error_line(err: BaseException, config_name: str) -> str:
    """The one line shown for ``err``: a composition error with the keys that exist, an OS error with its path."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ptune.checkpoints.config_checks import override_problem

    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return override_problem(err, config_name)
    for candidate in (err, err.__cause__, err.__context__):  # logging's "Unable to configure handler" wraps it
        if isinstance(candidate, OSError) and (line := os_error_line(candidate)):
            return line
    return " ".join(str(err).split()) or type(err).__name__


def _log_to_run_file(line: str) -> None:
    """The error into the run's log file too (Hydra's file handler, if the run got that far), so a failed run's
    folder says why it failed rather than holding an empty log."""
    record = logging.LogRecord("ptune", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_script(main: Callable[[], Any], script: str, config_name: str) -> None:
    """Run a ``@hydra.main`` function; an error the user can fix ends the process with ``script: <one line>`` (exit
    2 for a bad setting, 1 otherwise, 130 for Ctrl-C) instead of Hydra's 10-30-line traceback. With
    ``HYDRA_FULL_ERROR=1`` set by the user every error keeps its full traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises the error here instead of printing its traceback
    try:
        main()
    except KeyboardInterrupt as err:
        _exit_with(script, " ".join(str(err).split()) or "interrupted", 130)
    except Exception as err:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from ptune.checkpoints.config_checks import ConfigError

        if not _is_user_error(err):
            raise
        bad_setting = isinstance(err, (ConfigError, HydraException, OmegaConfBaseException))
        _exit_with(script, error_line(err, config_name), 2 if bad_setting else 1)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _is_user_error(err: Exception) -> bool:
    """An error the user can fix. The divergence check imports torch (seconds), so only for an error none of the
    others is: a refused setting is shown before torch would have loaded."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, (*USER_ERRORS, HydraException, OmegaConfBaseException)):
        return True
    from ptune.training.guards import DivergenceError

    return isinstance(err, DivergenceError)


def _exit_with(script: str, line: str, status: int) -> None:
    _log_to_run_file(line)
    print(f"{script}: {line}", file=sys.stderr)
    sys.exit(status)
