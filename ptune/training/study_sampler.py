"""The Optuna search's sampler: TPE seeded with the configured seed plus the trials already in the study, so a
resumed search draws new points while a fresh one draws the same as ``TPESampler(seed=seed)``.

Why our own: Hydra's Optuna sweeper instantiates ``hydra.sweeper.sampler`` from its config before it opens the
study, and offers no hook between opening the study and asking for the first trial. A sampler seeded only with
``seed`` replays its random draws from the start, so a study resumed during TPE's random start-up phase
(``n_startup_trials``) repeats its earlier trials exactly. Choosing the sampler's ``_target_`` is what the plugin
lets us change, so this class stands where ``optuna.samplers.TPESampler`` stood and takes the same options; it
builds the TPE sampler when it first sees the study: the first trial it is asked about is numbered by how many
trials the study already holds. Imported by Hydra (``conf/hydra/sweeper/prefix_search.yaml``) only, with Optuna.
"""

from __future__ import annotations

import logging
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)


class ResumingTPESampler(BaseSampler):
    """``TPESampler(seed=seed + trials already stored, **tpe_options)``, built at the study's first trial."""

    def __init__(self, seed: int | None = None, **tpe_options: Any) -> None:
        self._seed = seed
        self._options = tpe_options
        self._tpe: TPESampler | None = None

    def _sampler(self, study: Study, trial: FrozenTrial) -> TPESampler:
        if self._tpe is None:
            stored = trial.number  # trials are numbered from 0 in the order the study stored them
            seed = None if self._seed is None else self._seed + stored
            if stored and seed is not None:
                logger.info(
                    "sampler seed %d (hydra.sweeper.sampler.seed=%d + %d trials already in study '%s'): a resumed "
                    "search draws new points",
                    seed,
                    self._seed,
                    stored,
                    study.study_name,
                )
            self._tpe = TPESampler(seed=seed, **self._options)
        return self._tpe

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: list[float] | None) -> None:
        self._sampler(study, trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._tpe is not None:
            self._tpe.reseed_rng()
