"""Reports over several checkpoints: a table of every checkpoint, for a sweep a table of its jobs' swept
parameters against their final metrics (best first, with the best job's checkpoint), and a plot of each metric
against step with one line per run, legible with 16 runs (legend beside the axes, naming only what varies).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ptune.evaluation.metrics import METRIC_NAMES

logger = logging.getLogger(__name__)

RESULTS_NAME = "eval_results"  # .md and .csv: one row per checkpoint
SWEEP_NAME = "sweep_results"  # .md and .csv: one row per job of a sweep, best first
PLOT_FILE = "eval_metrics.png"
PLACES = 4  # the reference rounds every reported metric to 4 decimals


def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Floats to 4 places, as the reference reports them: no ``28.680619999999998`` in a file or a log line."""
    return {k: round(v, PLACES) if isinstance(v, float) else v for k, v in metrics.items()}


def generation_label(settings: dict[str, Any]) -> str:
    """How a row's answers were generated, for the tables (greedy or the sampling settings, and the budget), so
    that a table says whether greedy or ``generation=reference`` produced it."""
    if settings.get("max_length"):
        budget = f"prompt + answer <= {settings['max_length']} tokens"
    else:
        budget = f"<= {settings['max_new_tokens']} new tokens"
    if not settings["do_sample"]:
        return f"greedy, {budget}"
    return (
        f"sampled (top_p {settings['top_p']}, temperature {settings['temperature']}, seed {settings['seed']}), {budget}"
    )


def run_params(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides (Hydra's record; how sweep jobs differ), ``hydra.*`` ones aside."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    params = {}
    for override in OmegaConf.load(path):
        key, _, value = str(override).partition("=")
        if not key.startswith("hydra."):
            params[key.lstrip("+")] = value
    return params


def varying_keys(params: Sequence[dict[str, str]]) -> list[str]:
    """The keys whose value differs between runs: what a sweep swept (fixed overrides say nothing)."""
    keys = dict.fromkeys(key for p in params for key in p)
    return [key for key in keys if len({p.get(key) for p in params}) > 1]


def final_eval_loss(run_dir: Path) -> float | None:
    """The last eval loss of a training run (its ``trainer_state.json``), if it has one."""
    try:
        history = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    except (OSError, ValueError, KeyError):
        return None
    losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return round(losses[-1], PLACES) if losses else None


def sweep_table(rows: Sequence[dict[str, Any]], rank_by: str) -> list[dict[str, Any]]:
    """One row per run: its swept parameters, its last checkpoint's metrics and final eval loss; best first."""
    finals: dict[str, dict[str, Any]] = {}
    for row in rows:
        best_so_far = finals.get(row["run"])
        if best_so_far is None or (row["step"] or -1) >= (best_so_far["step"] or -1):
            finals[row["run"]] = row
    run_dirs = {run: Path(row["checkpoint"]).parent for run, row in finals.items()}
    params = {run: run_params(folder) for run, folder in run_dirs.items()}
    swept = varying_keys(list(params.values()))
    table = [
        {
            "run": run,
            **{key: params[run].get(key, "") for key in swept},
            "step": row["step"],
            **{name: row[name] for name in METRIC_NAMES},
            "eval_loss": final_eval_loss(run_dirs[run]),
            "checkpoint": row["checkpoint"],
        }
        for run, row in finals.items()
    ]
    table.sort(key=lambda r: -r[rank_by] if not math.isnan(r[rank_by]) else math.inf)
    return [{"rank": rank, **row} for rank, row in enumerate(table, 1)]


def write_report(rows: Sequence[dict[str, Any]], out_dir: Path, rank_by: str = "rouge-l") -> None:
    """``eval_results.md/.csv`` (every checkpoint), for several runs ``sweep_results.md/.csv`` (best first by
    ``rank_by``, the best job's checkpoint under the table), and ``eval_metrics.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tables(rows, out_dir / RESULTS_NAME)
    runs = dict.fromkeys(row["run"] for row in rows)
    if len(runs) > 1:
        table = sweep_table(rows, rank_by)
        best = table[0]
        note = f"Best by {rank_by}: run {best['run']}, {rank_by} {best[rank_by]}, checkpoint {best['checkpoint']}"
        _write_tables(table, out_dir / SWEEP_NAME, note=note)
        logger.info("%s", note)
    plot_metrics(rows, out_dir / PLOT_FILE)
    logger.info("results: %s.md/.csv, %s in %s", RESULTS_NAME, PLOT_FILE, out_dir)


def _write_tables(rows: Sequence[dict[str, Any]], stem: Path, note: str = "") -> None:
    columns = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + ("\n\n" + note if note else "") + "\n", encoding="utf-8")


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def metric_title(name: str, values: Sequence[float]) -> str:
    """A panel's title with the range its points span, so a small spread reads as small in numbers too."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return name
    return f"{name}: {min(finite):.2f} to {max(finite):.2f} (spread {max(finite) - min(finite):.2f})"


def plot_metrics(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Each metric against step, one line per run, labelled by the parameters that vary between runs only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(row["run"] for row in rows))
    params = {run: run_params(Path(next(r for r in rows if r["run"] == run)["checkpoint"]).parent) for run in runs}
    swept = varying_keys(list(params.values()))
    colours = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for number, run in enumerate(runs):
        points = sorted((row["step"], row) for row in rows if row["run"] == run and row["step"] is not None)
        label = ", ".join(f"{key}={params[run].get(key, '-')}" for key in swept) or run
        for axis, name in zip(axes.flat, METRIC_NAMES, strict=True):
            axis.plot(
                [step for step, _ in points],
                [row[name] for _, row in points],
                marker="osD^v<>p"[number % 8],
                color=colours(number % colours.N),
                label=f"{run}: {label}" if swept else label,
            )
    for axis, name in zip(axes.flat, METRIC_NAMES, strict=True):
        axis.set_title(metric_title(name, [row[name] for row in rows if row["step"] is not None]))
        axis.set_ylabel(f"{name} (x100)")
        axis.set_ylim(bottom=0)  # from 0, not auto-zoomed: 33.42 against 33.52 must not look like a large change
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize="small", title="run")
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
