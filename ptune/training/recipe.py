"""The training recipe, top to bottom: set up (data, base model, prefix, trainer), train, evaluate, save."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Seq2SeqTrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ptune.checkpoints.config_checks import check_base_model, check_resume_settings, check_train_config
from ptune.checkpoints.format import build_prefix, checkpoint_metadata, load_prefix_weights, read_metadata
from ptune.checkpoints.integrity import check_files
from ptune.checkpoints.state_io import read_trainer_state
from ptune.data.features import make_collator, tokenize_file
from ptune.data.packing import PackingCollator
from ptune.data.prompts import PromptFormat
from ptune.data.reading import read_examples, split_path
from ptune.model.base import load_base_model, load_tokenizer
from ptune.model.prefix import PrefixEncoder, PrefixShape, PrefixTunedModel
from ptune.model.prefix_init import initialise_prefix
from ptune.quantization.layers import model_quantization
from ptune.training.activation_checkpointing import resolve_activation_checkpointing
from ptune.training.guards import LossGuard
from ptune.training.objective import LOSS_OBJECTIVE, check_objective, final_objective
from ptune.training.trainer import PrefixTrainer
from ptune.utils.memory import ReleaseFreeMemory

logger = logging.getLogger(__name__)


def load_split(
    dataset_cfg: DictConfig, split_file: str, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat
) -> datasets.Dataset:
    """Read one split (``dataset.train_file`` or ``dataset.validation_file``) and tokenise it (cached)."""
    path = split_path(dataset_cfg.dir, split_file)
    read = read_examples(
        path,
        prompt_column=dataset_cfg.prompt_column,
        response_column=dataset_cfg.response_column,
        history_column=dataset_cfg.history_column,
        encoding=dataset_cfg.encoding,
    )
    logger.info("%s: %d rows (%d skipped: empty prompt or answer)", path, len(read.examples), read.skipped_empty)
    return tokenize_file(
        path,
        read.examples,
        tokenizer,
        prompt_format,
        dataset_cfg.max_source_length,
        dataset_cfg.max_target_length,
        dataset_cfg.cache_dir,
    )


def _first(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """``resume=auto``: the newest ``checkpoint-N`` in this run's directory (a fresh start if there is none);
    ``resume=PATH``: that checkpoint folder, or the newest checkpoint of that run folder."""
    if resume in (None, "", False):
        return None
    folder = Path(output_dir if resume == "auto" else resume).expanduser()
    if resume != "auto" and not folder.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such folder")
    if folder.name.startswith("checkpoint-"):
        return str(folder)
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None  # auto: the run folder may not exist yet
    if last is None and resume != "auto":
        raise FileNotFoundError(f"resume={resume}: no checkpoint-N folder in it")
    if last is None:
        logger.info("resume=auto: no checkpoint in %s, starting fresh", folder)
    return last


def training_arguments(cfg: DictConfig, output_dir: str) -> Seq2SeqTrainingArguments:
    """The ``trainer`` config group passes straight to ``Seq2SeqTrainingArguments``; these few are fixed.
    ``trainer.activation_checkpointing=auto`` counts as on here: build_trainer decides it once the model is loaded."""
    options: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    if options.get("activation_checkpointing") == "auto":
        options["activation_checkpointing"] = True
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        # CPU only: says so to accelerate, which otherwise runs torchrun ranks as independent jobs (no gloo DDP)
        options.setdefault("use_cpu", True)
        options.setdefault("dataloader_pin_memory", False)
        if options.get("fsdp"):
            logger.warning("trainer.fsdp: accelerate shards only on GPU ranks; on CPU this runs as plain DDP")
    if options.get("eval_steps") is None:
        options["eval_steps"] = options["save_steps"]
    return Seq2SeqTrainingArguments(
        output_dir=output_dir,
        seed=cfg.seed,
        eval_strategy="steps",
        eval_on_start=True,  # the untrained prefix's eval loss, as the first point of the curve
        save_strategy="steps",
        label_names=["labels"],  # the wrapper's forward(**kwargs) hides them from the trainer's inspection
        remove_unused_columns=False,  # the model's forward takes **kwargs; keep input_ids/labels as they are
        predict_with_generate=False,  # eval loss only; generation metrics are evaluate.py's job
        **options,
    )


def make_training_collator(dataset_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase):
    """Packed rows (``dataset.pack_length``) or rows padded to the longest of the micro-batch."""
    if dataset_cfg.get("pack_length"):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return PackingCollator(dataset_cfg.pack_length, pad)
    return make_collator(tokenizer, dataset_cfg.pad_to_multiple_of)


def prefix_start(
    cfg: DictConfig,
    prefix: PrefixEncoder,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    resume: str | None,
) -> dict[str, Any]:
    """Set the prefix's starting weights and return what checkpoints record of that start. A resume is never
    initialised (the checkpoint's weights replace any start; its recorded start is kept), ``init_from`` loads that
    checkpoint's prefix, otherwise ``prefix.init`` (``ptune.model.prefix_init``)."""
    if resume:
        return read_metadata(resume)["prefix"].get("init", {"kind": "random"})  # checkpoints before prefix.init
    if cfg.init_from:  # a fresh schedule from another run's prefix (train() has checked it fits the base)
        load_prefix_weights(cfg.init_from, prefix)
        logger.info("prefix weights from %s", cfg.init_from)
        return {"kind": "init_from", "checkpoint": str(Path(cfg.init_from).resolve())}
    return initialise_prefix(prefix, base, tokenizer, OmegaConf.to_container(cfg.prefix), cfg.seed)


def build_trainer(cfg: DictConfig, output_dir: str, resume: str | None = None) -> PrefixTrainer:
    """Everything before the first step: data, frozen base, the prefix at its start (``resume``: the checkpoint
    the trainer will load it from), and the trainer around them."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    prompt_format = PromptFormat.from_config(cfg.model.prompt)
    train_set = load_split(cfg.dataset, cfg.dataset.train_file, tokenizer, prompt_format)
    eval_set = load_split(cfg.dataset, cfg.dataset.validation_file, tokenizer, prompt_format)
    base = load_base_model(cfg.model.path, cfg.model.dtype, cfg.model.quantization)
    prefix = build_prefix(PrefixShape.from_config(base.config), cfg.prefix, base.config.hidden_size)
    start = prefix_start(cfg, prefix, base, tokenizer, resume)
    model = PrefixTunedModel(base, prefix, logits_multiple_of=cfg.dataset.pad_to_multiple_of or 1)
    metadata = checkpoint_metadata(
        prefix, cfg.model.path, OmegaConf.to_container(cfg, resolve=True), model_quantization(base)
    )
    metadata["prefix"]["init"] = start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("base %s frozen; prefix: %s trainable parameters", cfg.model.path, f"{trainable:,}")
    train_set = _first(train_set, cfg.max_train_samples)
    args = training_arguments(cfg, output_dir)
    checkpointing = resolve_activation_checkpointing(cfg, base, train_set, args.device)
    args.activation_checkpointing = args.gradient_checkpointing = checkpointing  # the old name mirrors the new
    trainer = PrefixTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=_first(eval_set, cfg.max_eval_samples),
        data_collator=make_training_collator(cfg.dataset, tokenizer),
        processing_class=tokenizer,
        checkpoint_metadata=metadata,
    )
    trainer.add_callback(LossGuard(model))  # a NaN/inf loss stops the run before anything of it is saved
    if trainer.args.device.type == "cpu":  # tensors on the C heap: each step's freed memory back to the OS
        trainer.add_callback(ReleaseFreeMemory)
    return trainer


def check_checkpoints(cfg: DictConfig, resume: str | None) -> None:
    """Before anything is loaded: the checkpoints a run starts from fit this base model, and one it resumes these
    settings (``ptune.checkpoints.config_checks``)."""
    if cfg.init_from:
        check_base_model(cfg.init_from, read_metadata(cfg.init_from), cfg.model.path, cfg.allow_base_mismatch)
    if resume:
        meta = read_metadata(resume)
        check_files(resume, meta)  # weights and training state as saved (SHA256), before anything is loaded
        read_trainer_state(resume)
        check_base_model(resume, meta, cfg.model.path, cfg.allow_base_mismatch)
        check_resume_settings(resume, meta, cfg)
        logger.info("resuming from %s", resume)


def eval_loss_at_resume(checkpoint: str) -> float | None:
    """The eval loss the checkpoint's log history has for its own step (None: none; then eval_on_start measures
    it, which would otherwise add it a second time to trainer_state.json)."""
    state = read_trainer_state(checkpoint)
    found = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e and e["step"] == state["global_step"]]
    return found[-1] if found else None


def finished(cfg: DictConfig, checkpoint: str | None) -> bool:
    """Whether the checkpoint resumed from is already at ``max_steps`` (a finished run resumed with resume=auto,
    or one killed between its final save and exit): then nothing is trained and nothing written."""
    if checkpoint is None:
        return False
    step = read_trainer_state(checkpoint)["global_step"]
    if step < cfg.trainer.max_steps:
        return False
    logger.info(
        "resume=%s: %s already reached max_steps=%d; nothing to train, nothing written (a longer run: "
        "init_from=%s max_steps=N in a new run folder)",
        cfg.resume,
        checkpoint,
        cfg.trainer.max_steps,
        checkpoint,
    )
    return True


def finished_objective(cfg: DictConfig, checkpoint: str, output_dir: str) -> float:
    """``cfg.objective`` of a finished run, from its records where they have it, else measured without writing."""
    eval_loss = eval_loss_at_resume(checkpoint)
    if cfg.objective == LOSS_OBJECTIVE and eval_loss is not None:
        return eval_loss
    quiet = cfg.copy()
    quiet.trainer.report_to = ["none"]  # measured again: nothing goes into the run's TensorBoard logs
    trainer = build_trainer(quiet, output_dir)
    load_prefix_weights(checkpoint, trainer.prefix_model.prefix)
    if eval_loss is None:
        eval_loss = float(trainer.evaluate()["eval_loss"])
    return final_objective(cfg, trainer, eval_loss)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the last checkpoint and how to go on from it."""


def train_interruptible(trainer: PrefixTrainer, checkpoint: str | None, output_dir: str) -> None:
    """``trainer.train``; Ctrl-C stops it with one line naming the newest checkpoint and the command resuming it."""
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        where = f"hydra.run.dir={output_dir}"
        raise Interrupted(
            f"interrupted at step {trainer.state.global_step}; the last checkpoint is {last}: continue with "
            f"python train.py resume=auto {where} (and the same settings)"
            if last
            else f"interrupted at step {trainer.state.global_step}, before the first checkpoint: nothing to resume"
        ) from None


def train(cfg: DictConfig, output_dir: str) -> float:
    """Train a prefix as ``cfg`` says, writing into ``output_dir``; return ``cfg.objective`` (the final eval loss
    by default; see ptune/training/objective.py)."""
    check_train_config(cfg)
    check_objective(cfg)
    checkpoint = resolve_resume(cfg.resume, output_dir)
    check_checkpoints(cfg, checkpoint)
    if finished(cfg, checkpoint):
        return finished_objective(cfg, checkpoint, output_dir)
    trainer = build_trainer(cfg, output_dir, checkpoint)
    if checkpoint and eval_loss_at_resume(checkpoint) is not None:
        trainer.args.eval_on_start = False
    train_interruptible(trainer, checkpoint, output_dir)
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    final_step_evaluated = evals and evals[-1]["step"] == trainer.state.global_step
    metrics = evals[-1] if final_step_evaluated else trainer.evaluate()
    trainer.save_state()  # trainer_state.json in the run folder: the whole log history, first eval to last
    if torch.distributed.is_initialized():  # leave together: a rank exiting early breaks the others' connections
        trainer.accelerator.wait_for_everyone()
        # Free DDP's reducer now, while its gloo group is alive on every rank: freed only after
        # destroy_process_group (when train() returns), the group's destructor could wait forever on a worker
        # thread (seen once in a 2-rank test run). The unwrapped model stays for the objective below.
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    logger.info("final eval loss %.4f; checkpoints in %s", metrics["eval_loss"], output_dir)
    return final_objective(cfg, trainer, float(metrics["eval_loss"]))
