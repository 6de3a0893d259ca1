"""Scoring checkpoints: generate an answer per evaluation row, write predictions as they come, compute metrics.

One checkpoint, every ``checkpoint-N`` of a run, or every checkpoint of every job of a sweep; for several, a
results table (Markdown, CSV) and a plot of each metric against step, one line per run.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ptune.checkpoint import META_FILE, PREFIX_FILE, atomic_write_bytes, read_metadata
from ptune.data import DataError, Example, read_examples
from ptune.features import file_sha256
from ptune.generation import GenerationSettings, generate_answers, reference_label
from ptune.loading import LoadedModel, load_checkpoint
from ptune.metrics import METRIC_NAMES, compute_metrics

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"
RESULTS_NAME = "eval_results"  # .md and .csv
PLOT_FILE = "eval_metrics.png"


# -- finding what to evaluate ------------------------------------------------------------------------------------
def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def find_checkpoints(target: str | Path) -> list[Path]:
    """A checkpoint folder itself, the ``checkpoint-N`` of a run folder, or those of every job of a sweep."""
    target = Path(target).expanduser()
    if not target.is_dir():
        raise FileNotFoundError(f"checkpoint={target}: no such folder")
    if (target / META_FILE).exists() or target.name.startswith("checkpoint-"):
        return [target]
    found = [p for p in target.glob("checkpoint-*") if p.is_dir()] or [
        p for p in target.glob("*/checkpoint-*") if p.is_dir()
    ]
    found = [p for p in found if p.name.rsplit("-", 1)[-1].isdigit()]
    if not found:
        raise FileNotFoundError(
            f"checkpoint={target}: no checkpoint-N folders in it or in its sub-folders; give a checkpoint, a run "
            "folder (outputs/DATE/TIME) or a sweep folder (multirun/DATE/TIME)"
        )
    return sorted(found, key=lambda p: (str(p.parent), checkpoint_step(p)))


def run_overrides(run_dir: Path) -> str:
    """The command-line overrides of the run, from Hydra's record (how sweep jobs differ)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    return " ".join(str(o) for o in OmegaConf.load(path) if not str(o).startswith("hydra."))


# -- data -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSet:
    path: Path
    examples: list[Example]
    sha256: str


def load_eval_set(dataset_cfg: dict[str, Any], max_samples: int | None) -> EvalSet:
    if not dataset_cfg.get("dir"):
        raise ValueError("the checkpoint records no evaluation data; name it: dataset=advertisegen dataset.dir=...")
    path = Path(dataset_cfg["dir"]).expanduser() / dataset_cfg["validation_file"]
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


def generation_settings(loaded: LoadedModel, overrides: dict[str, Any]) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": loaded.max_target_length, **overrides})


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(metrics, indent=2, ensure_ascii=False).encode())


def evaluate_checkpoint(loaded: LoadedModel, out_dir: Path, options: EvalOptions) -> dict[str, Any]:
    """Generate, write predictions chunk by chunk in input order, then metrics.json (atomically, last)."""
    meta = loaded.metadata
    eval_set = load_eval_set(options.dataset or meta["config"]["dataset"], options.max_samples)
    settings = generation_settings(loaded, options.settings_overrides)
    fingerprint = {
        "data": str(eval_set.path),
        "data_sha256": eval_set.sha256,
        "rows": len(eval_set.examples),
        "generation": asdict(settings),
        "prefix_sha256": file_sha256(Path(loaded.checkpoint) / PREFIX_FILE),
    }
    metrics_path, predictions_path = out_dir / METRICS_FILE, out_dir / PREDICTIONS_FILE
    if metrics_path.exists() and not options.force:
        previous = json.loads(metrics_path.read_text(encoding="utf-8"))
        if previous.get("settings") == fingerprint:
            logger.info("%s: already scored with these settings (force=true regenerates)", out_dir)
            return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path.unlink(missing_ok=True)  # never leave old metrics beside new predictions

    tokenizer = loaded.tokenizer
    labels = [reference_label(tokenizer, ex.response, loaded.max_target_length) for ex in eval_set.examples]
    predictions: list[str] = []
    chunk = options.batch_size * 4  # sorted by length within a chunk; written when the chunk is complete
    with open(predictions_path, "w", encoding="utf-8") as out:
        for start in range(0, len(eval_set.examples), chunk):
            part = eval_set.examples[start : start + chunk]
            answers = generate_answers(loaded, part, settings, options.batch_size)
            for label, answer in zip(labels[start : start + chunk], answers, strict=True):
                out.write(json.dumps({"labels": label, "predict": answer}, ensure_ascii=False) + "\n")
            out.flush()
            predictions += answers
            logger.info("%s: %d / %d rows generated", out_dir.name, len(predictions), len(labels))
    metrics = {**compute_metrics(predictions, labels, options.metric_processes), "settings": fingerprint}
    write_metrics(metrics_path, metrics)
    return metrics


def score_predictions(path: str | Path, processes: int | None = None) -> dict[str, Any]:
    """Metrics of an existing predictions file, written beside it as metrics.json."""
    labels, predictions = read_predictions(path)
    metrics = {**compute_metrics(predictions, labels, processes), "settings": {"predictions": str(path)}}
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


def evaluate_target(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate everything under ``cfg.checkpoint``; returns one row per checkpoint (and writes the report)."""
    target = Path(cfg.checkpoint).expanduser()
    checkpoints = find_checkpoints(target)
    options = EvalOptions(
        batch_size=cfg.batch_size,
        settings_overrides={k: v for k, v in OmegaConf.to_container(cfg.generation).items() if v is not None},
        max_samples=cfg.max_samples,
        dataset=OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.get("dataset") else None,
        metric_processes=cfg.metric_processes,
        force=cfg.force,
    )
    for checkpoint in checkpoints:  # fail before any generation if a checkpoint is broken
        read_metadata(checkpoint)
        if not (checkpoint / PREFIX_FILE).is_file():
            raise FileNotFoundError(f"{checkpoint}: no {PREFIX_FILE}; this is not a ptune checkpoint folder")
    out_root = Path(cfg.output_dir).expanduser() if cfg.output_dir else None
    rows, loaded, loaded_key = [], None, None
    for checkpoint in checkpoints:
        base_options = cfg.model.path, cfg.model.dtype, cfg.model.get("quantization")
        key = _loader_key(checkpoint, *base_options)
        if key != loaded_key:  # a new base/prefix configuration: load; otherwise only swap the prefix weights
            loaded, loaded_key = load_checkpoint(checkpoint, *base_options), key
        else:
            loaded.load_prefix(checkpoint)
        relative = checkpoint.relative_to(target) if checkpoint != target else Path()
        out_dir = out_root / relative if out_root else checkpoint
        metrics = evaluate_checkpoint(loaded, out_dir, options)
        run_dir = checkpoint.parent
        log_to_tensorboard(run_dir, checkpoint_step(checkpoint), metrics)
        rows.append(
            {
                "run": str(run_dir.relative_to(target)) if run_dir != target and len(checkpoints) > 1 else run_dir.name,
                "overrides": run_overrides(run_dir),
                "step": checkpoint_step(checkpoint),
                **{name: metrics[name] for name in (*METRIC_NAMES, "rows", "empty_prediction_share")},
            }
        )
        logger.info("%s: %s", checkpoint, {name: metrics[name] for name in METRIC_NAMES})
    if len(checkpoints) > 1:
        write_report(rows, out_root or target)
    return rows


def log_to_tensorboard(run_dir: Path, step: int, metrics: dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    with SummaryWriter(log_dir=str(run_dir / "runs" / "evaluate")) as writer:
        for name in METRIC_NAMES:
            writer.add_scalar(f"eval/{name}", metrics[name], step)


def write_report(rows: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """``eval_results.md`` / ``.csv`` (one row per checkpoint) and ``eval_metrics.png`` (metric vs step per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(out_dir / f"{RESULTS_NAME}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    (out_dir / f"{RESULTS_NAME}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    figure, axes = plt.subplots(1, len(METRIC_NAMES), figsize=(4 * len(METRIC_NAMES), 3.5))
    runs = dict.fromkeys(row["run"] for row in rows)
    for run in runs:
        points = sorted((row["step"], row) for row in rows if row["run"] == run)
        label = points[0][1]["overrides"] or run
        for axis, name in zip(axes, METRIC_NAMES, strict=True):
            axis.plot([s for s, _ in points], [r[name] for _, r in points], marker="o", label=label)
    for axis, name in zip(axes, METRIC_NAMES, strict=True):
        axis.set_title(name)
        axis.set_xlabel("step")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out_dir / PLOT_FILE, dpi=100)
    plt.close(figure)
    logger.info("results: %s.md, %s.csv, %s in %s", RESULTS_NAME, RESULTS_NAME, PLOT_FILE, out_dir)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
