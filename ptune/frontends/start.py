"""The start of every chat front end (``ptune chat | web | serve``): ``--help``, the config, the model, and a
one-line message instead of a traceback when any of them is wrong."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ptune.checkpoints.config_checks import ConfigError, override_problem
from ptune.training.hydra_setup import route_library_logs
from ptune.utils.paths import REPO_ROOT

if TYPE_CHECKING:
    from ptune.inference.loading import LoadedModel

LOOPBACK = ("127.0.0.1", "localhost", "::1")
HELP_FLAGS = ("-h", "--help")


def help_text(name: str, doc: str | None) -> str:
    """The front end's usage (its docstring's opening) and its options: ``conf/chat.yaml`` with its comments."""
    intro = (doc or "").strip().split("\n\n")
    usage = "\n\n".join(intro[:2])
    options = (REPO_ROOT / "conf" / "chat.yaml").read_text(encoding="utf-8")
    return f"{usage}\n\nOptions: key=value overrides of conf/chat.yaml (defaults and what each does):\n\n{options}"


def frontend_config(
    name: str, argv: list[str], doc: str | None, compose: Callable[[list[str]], DictConfig] | None = None
) -> DictConfig | int:
    """The composed config (``compose``: checked by default, which imports torch), or the exit status after
    printing the help (0) or a one-line error (2: bad config or override)."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(help_text(name, doc))
        return 0
    if compose is None:
        from ptune.frontends.common import compose_frontend_config as compose  # after --help: it imports torch
    try:
        return compose(list(argv))
    except (HydraException, OmegaConfBaseException, ConfigError) as err:
        line = override_problem(err, "chat") if not isinstance(err, ConfigError) else _one_line(err)
        print(f"ptune {name}: {line} (ptune {name} --help lists the keys)", file=sys.stderr)
        return 2


def frontend_setup(name: str, argv: list[str], doc: str | None) -> tuple[DictConfig, LoadedModel] | int:
    """``(config, loaded model)``, or the exit status after printing the help (0) or a one-line error (2: bad
    config or override, 1: the model could not be loaded)."""
    cfg = frontend_config(name, argv, doc)
    if isinstance(cfg, int):
        return cfg
    from ptune.frontends.common import load_model

    route_library_logs()
    try:
        loaded = load_model(cfg)
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError, OSError, SystemExit) as err:
        print(f"ptune {name}: {_one_line(err)}", file=sys.stderr)
        return 1
    return cfg, loaded


def configured_api_key(cfg: DictConfig) -> str | None:
    """The configured ``api_key``, or None for an open server (``api_key=null`` or empty)."""
    return None if cfg.api_key is None or str(cfg.api_key) == "" else str(cfg.api_key)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
