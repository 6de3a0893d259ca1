"""What ``python evaluate.py`` does with its composed config: check it, then score checkpoints or a predictions file."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from ptune.checkpoints.config_checks import check_evaluate_config
from ptune.evaluation.metrics import METRIC_NAMES
from ptune.evaluation.scoring import METRICS_FILE, evaluate_target, score_predictions

logger = logging.getLogger(__name__)


def evaluate_command(cfg: DictConfig) -> None:
    """Every value checked before anything is loaded (``max_samples=abc`` named, not a ``TypeError`` later), then
    ``checkpoint=`` scored or ``predictions=`` scored and its metrics shown."""
    check_evaluate_config(cfg)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if cfg.predictions:
        metrics = score_predictions(cfg.predictions, cfg.metric_processes)
        shown = {name: metrics[name] for name in (*METRIC_NAMES, "rows")}
        logger.info("%s: %s (also in %s beside it)", cfg.predictions, shown, METRICS_FILE)
    else:
        evaluate_target(cfg)
