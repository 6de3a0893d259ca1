"""Scoring checkpoints: generate an answer per evaluation row, write predictions as they come, compute metrics.

One checkpoint, every ``checkpoint-N`` of a run, or every checkpoint of every job of a sweep; for several, a
results table (Markdown, CSV) and a plot of each metric against step, one line per run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ptune.checkpoints.format import META_FILE, PREFIX_FILE, STAGING_DIR, atomic_write_bytes, read_metadata
from ptune.checkpoints.integrity import CorruptCheckpointError, check_file
from ptune.data.features import file_sha256
from ptune.data.reading import DataError, Example, read_examples, split_path
from ptune.evaluation.metrics import METRIC_NAMES, compute_metrics
from ptune.evaluation.report import generation_label, rounded, run_params, write_report
from ptune.inference.generation import GenerationSettings, decode, encode_prompt, generate_ids, reference_label
from ptune.inference.loading import LoadedModel, load_checkpoint
from ptune.model.base import config_sha256
from ptune.quantization.layers import model_quantization

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"


# -- finding what to evaluate ------------------------------------------------------------------------------------
def checkpoint_step(checkpoint: Path) -> int | None:
    """The training step of a checkpoint: its ``trainer_state.json``, else the number in a ``checkpoint-N...``
    name (``checkpoint-3000-ptune`` from ``ptune import-ptuning``), else None (a folder named ``best``)."""
    state = checkpoint / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable state: fall back to the name
    match = re.match(r"checkpoint-(\d+)", checkpoint.name)
    return int(match.group(1)) if match else None


def _hidden(path: Path) -> bool:
    """A folder being written, never a checkpoint: the trainer stages each save in ``.staging/`` (and any other
    dot-folder inside the scanned folder is not ours to score). Only folders inside the scanned one are judged:
    the dot-folders above it (``~/.cache``, ``~/.local``) are where the user chose to keep runs."""
    return path.name.startswith(".")


def _checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoint folders directly in ``folder``: ``checkpoint-*`` (a broken one is named later, not skipped)
    and any other folder with a ``ptune_checkpoint.json``."""
    return [
        p
        for p in folder.iterdir()
        if p.is_dir() and not _hidden(p) and (p.name.startswith("checkpoint-") or (p / META_FILE).is_file())
    ]


def find_checkpoints(target: str | Path) -> list[Path]:
    """A checkpoint folder itself, the checkpoints of a run folder, or those of every job of a sweep."""
    target = Path(target).expanduser()
    if not target.is_dir():
        raise FileNotFoundError(f"checkpoint={target}: no such folder")
    if STAGING_DIR in (target.name, target.parent.name):
        raise FileNotFoundError(
            f"checkpoint={target}: inside {STAGING_DIR}/, where checkpoints are written before they are complete; "
            "give the finished checkpoint-N beside it"
        )
    if (target / META_FILE).exists() or target.name.startswith("checkpoint-"):
        return [target]
    found = _checkpoints_in(target) or [
        p for job in sorted(target.iterdir()) if job.is_dir() and not _hidden(job) for p in _checkpoints_in(job)
    ]
    if not found:
        raise FileNotFoundError(
            f"checkpoint={target}: no checkpoint-N folders in it or in its sub-folders; give a checkpoint, a run "
            "folder (outputs/DATE/TIME) or a sweep folder (multirun/DATE/TIME)"
        )
    return sorted(found, key=lambda p: (str(p.parent), checkpoint_step(p) or -1, p.name))


# -- data -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSet:
    path: Path
    examples: list[Example]
    sha256: str


def load_eval_set(dataset_cfg: dict[str, Any], max_samples: int | None) -> EvalSet:
    if not dataset_cfg.get("dir"):
        raise ValueError("the checkpoint records no evaluation data; name it: dataset=advertisegen dataset.dir=...")
    path = split_path(dataset_cfg["dir"], dataset_cfg["validation_file"])
    read = read_examples(
        path,
        prompt_column=dataset_cfg["prompt_column"],
        response_column=dataset_cfg["response_column"],
        history_column=dataset_cfg.get("history_column"),
        encoding=dataset_cfg.get("encoding", "utf-8"),
    )
    examples = read.examples[:max_samples] if max_samples else read.examples
    return EvalSet(path=path, examples=examples, sha256=file_sha256(path))


def read_predictions(path: str | Path) -> tuple[list[str], list[str]]:
    """Labels and predictions of a ``generated_predictions.jsonl``; a bad line is named, never skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions={path}: no such file")
    labels, predictions = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict) or not isinstance(row.get("labels"), str) or "predict" not in row:
                raise DataError(f'{path}:{number}: expected {{"labels": str, "predict": str}}, got {line.strip()[:80]}')
            if not isinstance(row["predict"], str):
                raise DataError(f"{path}:{number}: 'predict' must be a string")
            labels.append(row["labels"])
            predictions.append(row["predict"])
    if not labels:
        raise DataError(f"{path}: no predictions in the file")
    return labels, predictions


# -- one checkpoint -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalOptions:
    batch_size: int
    settings_overrides: dict[str, Any]  # generation keys set by the user (None ones dropped)
    max_samples: int | None
    dataset: dict[str, Any] | None  # None: each checkpoint's own validation split
    metric_processes: int | None
    force: bool
    results: str | None = None  # sub-folder for results of non-default options (``results_folder``); None: in place


def generation_settings(loaded: LoadedModel, overrides: dict[str, Any]) -> GenerationSettings:
    """The settings a checkpoint is scored with: the user's ``generation.*`` over the default budget, which is the
    reference ``main.py``'s (prompt and answer together ``max_source_length + max_target_length + 1`` tokens), so
    no answer is cut shorter than the reference would cut it; a ``max_new_tokens`` given is a fixed cap instead."""
    budget = loaded.max_source_length + loaded.max_target_length + 1
    if "max_new_tokens" in overrides:
        return GenerationSettings(**{**overrides, "max_length": None})
    max_length = overrides.get("max_length", budget)  # max_new_tokens: only an upper bound then
    return GenerationSettings(**{**overrides, "max_new_tokens": max_length, "max_length": max_length})


def scoring_settings(loaded: LoadedModel, eval_set: EvalSet, settings: GenerationSettings) -> dict[str, Any]:
    """Everything that changes an answer or its score, read from the loaded model itself: the data (file, hash,
    rows), the base (folder, config.json hash, dtype, quantization), the prompt lengths, the generation settings
    and the prefix weights. ``metrics.json`` records it as ``settings``; equal settings mean already scored."""
    base = getattr(loaded.model, "base", loaded.model)
    return {
        "data": str(eval_set.path),
        "data_sha256": eval_set.sha256,
        "rows": len(eval_set.examples),
        "base": loaded.base_path,
        "base_config_sha256": config_sha256(loaded.base_path),
        "dtype": str(base.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "quantization": model_quantization(base),
        "max_source_length": loaded.max_source_length,
        "max_target_length": loaded.max_target_length,
        "generation": asdict(settings),
        "prefix_sha256": file_sha256(Path(loaded.checkpoint) / PREFIX_FILE),
    }


def results_folder(cfg: DictConfig) -> str | None:
    """Where results of these options go inside each checkpoint (and run) folder: in place for the defaults (the
    checkpoint's own validation split, every row, its recorded base, the default generation), else ``eval-ID``
    with ID a hash of the options that differ, so results on other data or settings never replace others."""
    asked = {
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.get("dataset") else None,
        "max_samples": cfg.max_samples,
        "model": {k: v for k, v in OmegaConf.to_container(cfg.model).items() if v is not None},
        "generation": {k: v for k, v in OmegaConf.to_container(cfg.generation).items() if v != _DEFAULTS.get(k)},
    }
    if not any(asked.values()):
        return None
    return "eval-" + hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]


_DEFAULTS = {**asdict(GenerationSettings()), "max_new_tokens": None, "max_length": None}


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(metrics, indent=2, ensure_ascii=False).encode())


def score(predictions: Sequence[str], labels: Sequence[str], processes: int | None) -> dict[str, Any]:
    """The reference metrics, rounded to 4 places as the reference reports them (in files and logs alike)."""
    return rounded(compute_metrics(predictions, labels, processes))


def eval_labels(loaded: LoadedModel, examples: Sequence[Example]) -> list[str]:
    return [reference_label(loaded.tokenizer, ex.response, loaded.max_target_length) for ex in examples]


def generate_with_progress(
    loaded: LoadedModel,
    examples: Sequence[Example],
    settings: GenerationSettings,
    batch_size: int,
    label: str,
    on_chunk: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """Answers for ``examples`` in input order, through the one generation path, with a progress bar (rows done,
    generated tokens per second) and a log line per chunk. Rows are generated a chunk (4 batches) at a time,
    sorted by length within it; ``on_chunk(start, answers)`` gets each chunk when complete, in input order."""
    answers: list[str] = []
    tokens, started = 0, time.perf_counter()
    chunk = batch_size * 4
    with tqdm(total=len(examples), desc=f"{label}: generating", unit="row", dynamic_ncols=True) as bar:
        for start in range(0, len(examples), chunk):
            part = examples[start : start + chunk]
            prompts = [encode_prompt(loaded, ex.prompt, ex.history) for ex in part]
            done = [""] * len(part)
            for index, ids in generate_ids(loaded, prompts, settings, batch_size):
                done[index] = decode(loaded.tokenizer, ids)
                tokens += len(ids)
                bar.update(1)
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):.0f} tokens/s", refresh=False)
            answers += done
            if on_chunk is not None:
                on_chunk(start, done)
            rate = tokens / (time.perf_counter() - started)
            logger.info("%s: %d / %d rows generated (%.0f tokens/s)", label, len(answers), len(examples), rate)
    return answers


def score_examples(
    loaded: LoadedModel,
    examples: Sequence[Example],
    batch_size: int,
    label: str,
    settings: GenerationSettings | None = None,
    processes: int | None = None,
) -> dict[str, Any]:
    """Generate and score ``examples`` without writing anything: what the training objective uses; the numbers
    equal those ``evaluate_checkpoint`` writes for the same rows and settings."""
    settings = settings or generation_settings(loaded, {})
    predictions = generate_with_progress(loaded, examples, settings, batch_size, label)
    return score(predictions, eval_labels(loaded, examples), processes)


def evaluate_checkpoint(loaded: LoadedModel, out_dir: Path, options: EvalOptions) -> dict[str, Any]:
    """Generate, write predictions chunk by chunk in input order, then metrics.json (atomically, last)."""
    meta = loaded.metadata
    eval_set = load_eval_set(options.dataset or meta["config"]["dataset"], options.max_samples)
    settings = generation_settings(loaded, options.settings_overrides)
    fingerprint = scoring_settings(loaded, eval_set, settings)
    metrics_path, predictions_path = out_dir / METRICS_FILE, out_dir / PREDICTIONS_FILE
    if metrics_path.exists() and not options.force:
        previous = json.loads(metrics_path.read_text(encoding="utf-8"))
        if previous.get("settings") == fingerprint:
            logger.info("%s: already scored with these settings (force=true regenerates)", out_dir)
            return {**previous, "already_scored": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path.unlink(missing_ok=True)  # never leave old metrics beside new predictions

    labels = eval_labels(loaded, eval_set.examples)
    with open(predictions_path, "w", encoding="utf-8") as out:

        def write_chunk(start: int, answers: list[str]) -> None:  # as each chunk completes, in input order
            for label, answer in zip(labels[start : start + len(answers)], answers, strict=True):
                out.write(json.dumps({"labels": label, "predict": answer}, ensure_ascii=False) + "\n")
            out.flush()

        predictions = generate_with_progress(
            loaded, eval_set.examples, settings, options.batch_size, out_dir.name, write_chunk
        )
    metrics = {**score(predictions, labels, options.metric_processes), "settings": fingerprint}
    write_metrics(metrics_path, metrics)
    return metrics


def score_predictions(path: str | Path, processes: int | None = None) -> dict[str, Any]:
    """Metrics of an existing predictions file, written beside it as metrics.json."""
    labels, predictions = read_predictions(path)
    metrics = {**score(predictions, labels, processes), "settings": {"predictions": str(path)}}
    write_metrics(Path(path).with_name(METRICS_FILE), metrics)
    return metrics


# -- many checkpoints -----------------------------------------------------------------------------------------
def _loader_key(checkpoint: Path, model_path: str | None, dtype: str | None, quantization: str | None) -> str:
    meta = read_metadata(checkpoint)
    spec = {k: v for k, v in meta["prefix"].items() if k != "dropout"}
    base = model_path or meta["base_model"]["path"]
    quantized = quantization or meta["base_model"].get("quantization")
    return json.dumps(
        [base, dtype or meta["config"]["model"]["dtype"], quantized, spec, meta["config"]["model"]["prompt"]]
    )


def usable_checkpoints(checkpoints: list[Path]) -> list[Path]:
    """Before any generation: the checkpoints whose metadata and weights are intact. One alone that is not fails;
    among several (a run, a sweep) a broken one is skipped with a warning naming it and why, the rest scored."""
    usable = []
    for checkpoint in checkpoints:
        try:
            meta = read_metadata(checkpoint)
            if not (checkpoint / PREFIX_FILE).is_file():
                raise FileNotFoundError(f"{checkpoint}: no {PREFIX_FILE}; this is not a ptune checkpoint folder")
            check_file(checkpoint, PREFIX_FILE, meta)
        except (FileNotFoundError, CorruptCheckpointError) as err:
            if len(checkpoints) == 1:
                raise
            logger.warning("skipping %s, not scored: %s", checkpoint, err)
            continue
        usable.append(checkpoint)
    if not usable:
        raise FileNotFoundError(f"none of the {len(checkpoints)} checkpoints can be scored (each named above)")
    return usable


def evaluate_target(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate everything under ``cfg.checkpoint``; returns one row per checkpoint (and writes the report)."""
    target = Path(cfg.checkpoint).expanduser()
    found = find_checkpoints(target)
    options = EvalOptions(
        batch_size=cfg.batch_size,
        settings_overrides={k: v for k, v in OmegaConf.to_container(cfg.generation).items() if v is not None},
        max_samples=cfg.max_samples,
        dataset=OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.get("dataset") else None,
        metric_processes=cfg.metric_processes,
        force=cfg.force,
        results=results_folder(cfg),
    )
    checkpoints = usable_checkpoints(found)
    objectives = {read_metadata(checkpoint)["config"].get("objective") for checkpoint in checkpoints}
    out_root = Path(cfg.output_dir).expanduser() if cfg.output_dir else None
    if out_root is None and options.results:
        logger.info("results of these options go to %s/ in each folder (metrics.json lists them)", options.results)
    rows, loaded, loaded_key = [], None, None
    for checkpoint in checkpoints:
        base_options = cfg.model.path, cfg.model.dtype, cfg.model.get("quantization")
        key = _loader_key(checkpoint, *base_options)
        try:
            if key != loaded_key:  # a new base/prefix configuration: load; otherwise only swap the prefix weights
                allow = cfg.allow_base_mismatch
                loaded, loaded_key = load_checkpoint(checkpoint, *base_options, allow_base_mismatch=allow), key
            else:
                loaded.load_prefix(checkpoint)
        except CorruptCheckpointError as err:  # weights that parse badly and record no hash (an older checkpoint)
            if len(checkpoints) == 1:
                raise
            logger.warning("skipping %s, not scored: %s", checkpoint, err)
            continue
        relative = checkpoint.relative_to(target) if checkpoint != target else Path()
        out_dir = out_root / relative if out_root else checkpoint / (options.results or "")
        metrics = evaluate_checkpoint(loaded, out_dir, options)
        run_dir, step = checkpoint.parent, checkpoint_step(checkpoint)
        if not metrics.get("already_scored"):  # logged when scored, once
            log_to_tensorboard(run_dir, step, metrics, options.results or "eval")
        rows.append(
            {
                "run": str(run_dir.relative_to(target)) if run_dir != target and len(checkpoints) > 1 else run_dir.name,
                "overrides": " ".join(f"{k}={v}" for k, v in run_params(run_dir).items()),
                "step": step,
                **{name: metrics[name] for name in (*METRIC_NAMES, "rows", "empty_prediction_share")},
                "generation": generation_label(metrics["settings"]["generation"]),
                "checkpoint": str(checkpoint),
            }
        )
        logger.info("%s: %s", checkpoint, {name: metrics[name] for name in METRIC_NAMES})
    if len(found) > 1 and rows:  # a run or sweep gets its table, also when a broken checkpoint was skipped
        (objective,) = objectives if len(objectives) == 1 else (None,)
        report_dir = out_root or target / (options.results or "")
        write_report(rows, report_dir, rank_by=objective if objective in METRIC_NAMES else "rouge-l")
    return rows


def log_to_tensorboard(run_dir: Path, step: int | None, metrics: dict[str, Any], group: str = "eval") -> None:
    """Metrics into the run's TensorBoard logs as ``group/rouge-1`` ... (``eval`` for the default options, the
    results folder's name for others, so other data never joins the same curve), next to its loss curves; only for a
    training run's checkpoint with a step (not an imported checkpoint in someone else's folder)."""
    if step is None or not (run_dir / "trainer_state.json").is_file():
        return
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    with SummaryWriter(log_dir=str(run_dir / "runs" / "evaluate")) as writer:
        for name in METRIC_NAMES:
            writer.add_scalar(f"{group}/{name}", metrics[name], step)
