"""What ``train.py`` returns, so that a sweeper can optimise it: ``objective=eval_loss`` (minimised) or a
generation metric, ``rouge-1 | rouge-2 | rouge-l | bleu-4`` (maximised).

A generation metric is scored at the end of training on the first ``objective_samples`` validation rows by the
evaluator's own code (:func:`ptune.evaluation.scoring.score_examples`: the same prompts, greedy generation, labels and
reference metrics, rounded as ``metrics.json`` is), on the model still in memory, so ``evaluate.py`` on the final
checkpoint with ``max_samples=objective_samples`` reports the same number. Loss and answer quality often disagree
(a lower loss can come with blander answers), which is why a search can target either.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from ptune.training.trainer import PrefixTrainer

logger = logging.getLogger(__name__)

LOSS_OBJECTIVE = "eval_loss"


def objective_direction(objective: str) -> str:
    """``minimize`` for the loss, ``maximize`` for a generation metric (the Optuna sweeper's ``direction``)."""
    return "minimize" if objective == LOSS_OBJECTIVE else "maximize"


def objective_names() -> tuple[str, ...]:
    from ptune.evaluation.metrics import (
        METRIC_NAMES,  # imported here: hydra_setup imports this module before Hydra starts
    )

    return (LOSS_OBJECTIVE, *METRIC_NAMES)


def check_objective(cfg: DictConfig) -> None:
    """Refuse an unknown ``objective`` or a useless ``objective_samples`` before anything is loaded or trained."""
    if cfg.objective not in objective_names():
        raise ValueError(f"objective={cfg.objective}: unknown; choose one of {', '.join(objective_names())}")
    samples = cfg.objective_samples
    if cfg.objective != LOSS_OBJECTIVE and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"objective_samples={samples}: give a number of validation rows >= 1 for objective=rouge-l")


def final_objective(cfg: DictConfig, trainer: PrefixTrainer, eval_loss: float) -> float:
    """The value of ``cfg.objective`` for the trained prefix in ``trainer``."""
    if cfg.objective == LOSS_OBJECTIVE:
        return eval_loss
    from ptune.data.prompts import PromptFormat
    from ptune.evaluation.scoring import load_eval_set, score_examples
    from ptune.inference.loading import LoadedModel

    loaded = LoadedModel(
        model=trainer.model.eval(),
        tokenizer=trainer.processing_class,
        prompt_format=PromptFormat.from_config(cfg.model.prompt),
        base_path=str(cfg.model.path),
        max_source_length=cfg.dataset.max_source_length,
        max_target_length=cfg.dataset.max_target_length,
    )
    eval_set = load_eval_set(OmegaConf.to_container(cfg.dataset, resolve=True), cfg.objective_samples)
    batch_size = trainer.args.per_device_eval_batch_size
    metrics = score_examples(loaded, eval_set.examples, batch_size=batch_size, label=f"objective {cfg.objective}")
    logger.info("objective %s on the first %d validation rows: %s", cfg.objective, metrics["rows"], metrics)
    return float(metrics[cfg.objective])
