"""transformers' ``Seq2SeqTrainer`` with prefix-only, safetensors-only, atomic checkpoints.

The loop, schedule, logging, evaluation and resume logic are the library's. Overridden, and only these:
- what a checkpoint holds: the prefix and its metadata (``_save`` / ``_load_from_checkpoint``), never the base;
- how optimizer, scheduler and RNG states are stored: safetensors + JSON instead of pickles
  (``ptune.checkpoints.state_io``);
- where a checkpoint is written: into a hidden staging folder that is renamed to ``checkpoint-N`` when complete,
  so an interrupted save never leaves a folder that ``resume=auto`` would pick up; every file is fsynced before
  the rename and the folders after it, so a complete-looking checkpoint is complete after a power loss too; the
  SHA256 of every file goes into its ``ptune_checkpoint.json`` just before;
- the logging, eval and save intervals on resume: this run's, not the ones in the checkpoint's trainer state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import Seq2SeqTrainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ptune.checkpoints import state_io
from ptune.checkpoints.format import STAGING_DIR, load_prefix_weights, record_file_hashes, save_prefix_checkpoint
from ptune.model.prefix import PrefixTunedModel
from ptune.utils.durable import fsync_dir, fsync_tree

logger = logging.getLogger(__name__)


class PrefixTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` for a :class:`PrefixTunedModel`; ``checkpoint_metadata`` goes into every checkpoint."""

    def __init__(self, *args, checkpoint_metadata: dict[str, Any], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_metadata = checkpoint_metadata
        self._staging: str | None = None
        # Loss lines go to the logger (console and the run's log file) once, not also printed by the progress bar
        # (or, with trainer.disable_tqdm=true, by the library's PrinterCallback instead of a bar).
        self.remove_callback(PrinterCallback if self.args.disable_tqdm else ProgressCallback)
        if not self.args.disable_tqdm:
            self.add_callback(QuietProgressCallback)
        self.add_callback(LogMetricsCallback)

    @property
    def prefix_model(self) -> PrefixTunedModel:
        return self.model

    # -- the checkpoint's content -------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_prefix_checkpoint(
                output_dir or self.args.output_dir, self.prefix_model.prefix, self.checkpoint_metadata
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_prefix_weights(resume_from_checkpoint, self.prefix_model.prefix)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.args.should_save:
            state_io.save_optimizer(self.optimizer, output_dir)
            state_io.save_scheduler(self.lr_scheduler, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            state_io.load_optimizer(self.optimizer, checkpoint)
            state_io.load_scheduler(self.lr_scheduler, checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        rank = self.args.process_index if self.args.world_size > 1 else None
        state_io.save_rng_state(output_dir, rank)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            rank = self.args.process_index if self.args.world_size > 1 else None
            state_io.load_rng_state(checkpoint, rank)

    def _init_training_state(self, max_steps, *args, **kwargs) -> tuple[int, int]:
        """Resumed, the library keeps the checkpoint's intervals (its trainer_state.json); intervals may change on
        resume (``RESUME_FREE``), so this run's ``logging_steps``/``eval_steps``/``save_steps`` replace them."""
        resumed = super()._init_training_state(max_steps, *args, **kwargs)
        before = {kind: getattr(self.state, f"{kind}_steps") for kind in ("logging", "eval", "save")}
        self.state.compute_steps(self.args, max_steps)
        after = {kind: getattr(self.state, f"{kind}_steps") for kind in before}
        if before != after:
            changed = ", ".join(f"{k}_steps {before[k]} -> {after[k]}" for k in before if before[k] != after[k])
            logger.info("intervals of this run applied to the resumed one: %s", changed)
        return resumed

    # -- atomic checkpoint folders ------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging_root / name, ignore_errors=True)
        self._staging = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            record_file_hashes(staging_root / name, self.checkpoint_metadata)  # every file is written by now
            fsync_tree(staging_root / name)  # every file on disk before the name says the checkpoint is complete
            final = run_dir / name
            old = staging_root / f"{name}.old"
            if old.exists():  # left by a kill between the two renames below; what it held is saved again now
                logger.warning("removing %s, left by an interrupted save", old)
                shutil.rmtree(old)
            if final.exists():  # the same step saved again (e.g. a resumed run): swap, then drop the old one
                os.replace(final, old)
                os.replace(staging_root / name, final)
                fsync_dir(run_dir)
                shutil.rmtree(old)
            else:
                os.replace(staging_root / name, final)
                fsync_dir(run_dir)
            fsync_dir(staging_root)
            with contextlib.suppress(OSError):
                staging_root.rmdir()  # only if empty: nothing else is staged
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging_root:
                self.state.best_model_checkpoint = str(run_dir / Path(self.state.best_model_checkpoint).name)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class QuietProgressCallback(ProgressCallback):
    """The library's progress bars, without printing each log dict (``LogMetricsCallback`` logs it instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        pass


class LogMetricsCallback(TrainerCallback):
    """Send every log dict (loss, learning rate, eval loss) to the ``ptune`` logger, hence to the run's log file."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if state.is_world_process_zero and logs:
            shown = {k: v for k, v in logs.items() if k != "total_flos"}
            logger.info("step %d: %s", state.global_step, json.dumps(shown))
