"""``conf/chat.yaml`` composed with command-line overrides, without importing torch (``ptune serve``'s HTTP
process composes it; the checks that need the model's modules run where the model is loaded)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ptune.utils.paths import REPO_ROOT


def compose_chat_config(overrides: list[str]) -> DictConfig:
    """``conf/chat.yaml`` with ``key=value`` overrides, as Hydra composes it for train.py."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="chat", overrides=overrides)
