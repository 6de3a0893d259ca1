"""Wall time of one 4-job sweep (`train.py -m prefix.length=8,16 learning_rate=1e-2,2e-2`): Hydra's basic launcher
(one job after another) against `hydra/launcher=joblib hydra.launcher.n_jobs=2` (two at a time, each job's torch
threads capped to cores / 2 by ptune). Fresh processes, the two sides alternating; prints a Markdown table.

    flock /tmp/ptune-bench.lock .venv/bin/python benchmarks/sweep_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = ["max_steps=30", "save_steps=30", "max_eval_samples=32", "trainer.report_to=[none]"]
SIDES = {
    "basic launcher (sequential)": [],
    "joblib, n_jobs=2": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}


def one_sweep(extra: list[str], cache: Path) -> float:
    with tempfile.TemporaryDirectory() as cwd:
        command = [sys.executable, str(REPO / "train.py"), "-m", "prefix.length=8,16", "learning_rate=1e-2,2e-2"]
        command += [*JOB, f"dataset.cache_dir={cache}", *extra]
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per side (alternating)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        one_sweep([], Path(cache))  # warm-up: tokenises into the cache once, so neither side pays for it
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side, extra in SIDES.items():
                times[side].append(one_sweep(extra, Path(cache)))
    load = os.getloadavg()
    base = statistics.median(times[next(iter(SIDES))])
    print(f"4-job sweep, {os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n")
    print("| launcher | runs (s) | median (s) | speed-up |\n|---|---|---|---|")
    for side, runs in times.items():
        median = statistics.median(runs)
        print(f"| {side} | {', '.join(f'{t:.1f}' for t in runs)} | {median:.1f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
