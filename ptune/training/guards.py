"""Stop a run whose training loss is no longer a number; warn when it climbs far above where it started.

A NaN or infinite loss makes every later step useless (AdamW turns the prefix into NaN) while the trainer carries
on and saves checkpoints of it. :class:`LossGuard` checks the loss of every optimizer step: at its end, before the
trainer logs, evaluates or saves, so no checkpoint is written after the step where the loss went bad. The losses
of a step's micro-batches are kept as tensors and checked once per step (one device sync, not one per forward).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class LossGuard(TrainerCallback):
    """Records the loss of each training forward of ``model``; checks it at the end of every optimizer step."""

    def __init__(self, model: nn.Module, rise_factor: float = 2.0) -> None:
        self.rise_factor = rise_factor
        self._losses: list[torch.Tensor] = []
        self.first: float | None = None
        self.last_finite: tuple[int, float] | None = None  # (step, loss)
        self._warned = False
        model.register_forward_hook(self._record)

    def _record(self, module: nn.Module, _args: tuple, output) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:
            self._losses.append(loss.detach())

    def on_step_end(self, args, state, control, **kwargs):
        if not self._losses:
            return
        # the micro-batch losses of a step add up to the step's loss (each is divided by the step's label count)
        loss = float(torch.stack(self._losses).float().sum())
        self._losses.clear()
        if not math.isfinite(loss):
            last = (
                f"the last finite loss was {self.last_finite[1]:.4f} at step {self.last_finite[0]}"
                if self.last_finite
                else "no step had a finite loss"
            )
            raise DivergenceError(
                f"training stopped at step {state.global_step}: the loss is {loss} ({last}); no checkpoint was "
                "written for this step. Lower learning_rate, use model.dtype=bfloat16 or float32 rather than "
                "float16, or check the data."
            )
        self.last_finite = (state.global_step, loss)
        if self.first is None:
            self.first = loss
        elif not self._warned and loss > self.rise_factor * self.first:
            self._warned = True
            logger.warning(
                "the training loss rose from %.4f (first step) to %.4f at step %d, more than %.0fx: the learning "
                "rate may be too high (learning_rate=%g)",
                self.first,
                loss,
                state.global_step,
                self.rise_factor,
                args.learning_rate,
            )
