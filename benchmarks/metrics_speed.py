"""Time the reference ChatGLM2 per-row metrics loop against ptune.evaluation.metrics.compute_metrics; check they agree.

Usage: ``.venv/bin/python benchmarks/metrics_speed.py [--rows 1000] [--repeats 3] [--processes N]``

Pairs come from the real AdvertiseGen dev summaries in ``../shared`` when present (read-only, nothing is copied),
else from the repository's synthetic set. Each label is a summary; its prediction is, in turn, another row's
summary, a perturbed copy of the label (characters dropped or replaced), a truncated label, or half the label
followed by half of another summary. No prediction is blank, so the literal reference loop never crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jieba  # noqa: E402
import numpy as np  # noqa: E402

from ptune.evaluation.metrics import METRIC_NAMES, compute_metrics, score_pairs  # noqa: E402  (also quiets jieba's startup log)
from tests.evaluation.test_metrics import reference_scores  # noqa: E402

SHARED_DEV = REPO.parent / "shared" / "data" / "advertisegen" / "dev.json"
SYNTHETIC_DEV = REPO / "data" / "synthetic_adgen" / "dev.json"


def reference_metrics(preds: list[str], labels: list[str]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The ChatGLM2-6B ptuning/main.py way (the test suite's oracle: a fresh ``Rouge()`` per row), averaged as it
    reports them; also the per-row lists it averaged, for the per-row check."""
    rows = reference_scores(preds, labels)
    per_row = {name: [row[name] for row in rows] for name in METRIC_NAMES}
    return {name: float(np.mean(values)) for name, values in per_row.items()}, per_row


def perturb(text: str, alphabet: str, rng: random.Random) -> list[str]:
    """About 10% of characters replaced by random summary characters and 10% dropped."""
    chars = []
    for c in text:
        r = rng.random()
        if r < 0.1:
            chars.append(rng.choice(alphabet))
        elif r >= 0.2:
            chars.append(c)
    return chars


def build_pairs(rows: int, seed: int = 0) -> tuple[list[str], list[str], str]:
    source = SHARED_DEV if SHARED_DEV.exists() else SYNTHETIC_DEV
    summaries = [json.loads(line)["summary"] for line in source.read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(seed)
    alphabet = "".join(summaries[:50])
    predictions, labels = [], []
    for i in range(rows):
        label = summaries[i % len(summaries)]
        other = summaries[(i * 7 + 3) % len(summaries)]
        kind = i % 4
        if kind == 0:
            prediction = other
        elif kind == 1:
            prediction = "".join(perturb(label, alphabet, rng))
        elif kind == 2:
            prediction = label[: max(1, len(label) // 3)]
        else:
            prediction = label[: len(label) // 2] + other[len(other) // 2 :]
        predictions.append(prediction if prediction.strip() else other)
        labels.append(label)
    return predictions, labels, str(source)


def timed(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds and last result of each function, run round-robin so that load from anything else on the
    machine falls on all of them alike rather than on whichever happened to run while it lasted."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=None, help="workers for compute_metrics (os.cpu_count())")
    args = parser.parse_args()

    predictions, labels, source = build_pairs(args.rows)
    jieba.initialize()  # all start with jieba's dictionary loaded: its ~1 s load is in no timing

    load = os.getloadavg()[0]  # before we add our own
    seconds, results = timed(
        {
            "reference": lambda: reference_metrics(predictions, labels),
            "serial": lambda: compute_metrics(predictions, labels, processes=1),
            "parallel": lambda: compute_metrics(predictions, labels, processes=args.processes),
        },
        args.repeats,
    )
    ref_s, serial_s, ours_s = seconds["reference"], seconds["serial"], seconds["parallel"]
    (ref, ref_rows), serial, ours = results["reference"], results["serial"], results["parallel"]
    for name in METRIC_NAMES:
        assert ours[name] == ref[name] == serial[name], (name, ours[name], ref[name], serial[name])
    our_rows = score_pairs(predictions, labels, processes=args.processes)  # untimed: every row, not just the means
    for name in METRIC_NAMES:
        assert [row[name] for row in our_rows] == ref_rows[name], name

    processes = args.processes or os.cpu_count()
    print(f"pairs: {len(predictions)} from {source} (label = a summary; prediction = another summary, a perturbed,")
    print("truncated or half-swapped copy of it); jieba's dictionary was loaded before timing any of them.")
    print(f"machine: os.cpu_count() = {os.cpu_count()}, {platform.platform()}, Python {platform.python_version()}")
    print(f"seconds: median of {args.repeats} repeats, the three run round-robin; 1-min load average before {load:.2f}")
    print()
    print("| implementation | rows | seconds | rows/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    n = len(predictions)
    print(f"| reference per-row loop (fresh Rouge() per row) | {n} | {ref_s:.3f} | {n / ref_s:.0f} | 1.00x |")
    print(f"| compute_metrics, processes=1 | {n} | {serial_s:.3f} | {n / serial_s:.0f} | {ref_s / serial_s:.2f}x |")
    print(f"| compute_metrics, processes={processes} | {n} | {ours_s:.3f} | {n / ours_s:.0f} | {ref_s / ours_s:.2f}x |")
    print()
    means = ", ".join(f"{name} {ours[name]:.4f}" for name in METRIC_NAMES)
    print(f"every row's four numbers and the means identical (==): {means}")


if __name__ == "__main__":
    main()
