"""Wall time of one 4-job sweep (`train.py -m prefix.length=8,16 learning_rate=1e-2,2e-2`): Hydra's basic launcher
(one job after another) against `hydra/launcher=joblib hydra.launcher.n_jobs=2` (two at a time, each job's torch
threads capped to cores / 2 by ptune). Fresh processes, the two sides alternating; prints a Markdown table.

    flock /tmp/ptune-bench.lock .venv/bin/python benchmarks/sweep_speed.py --repeats 3 --steps 100
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
JOB = ["max_eval_samples=32", "trainer.report_to=[none]"]
SIDES = {
    "basic launcher (sequential)": [],
    "joblib, n_jobs=2": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}


def one_sweep(extra: list[str], cache: Path, steps: int) -> float:
    with tempfile.TemporaryDirectory() as cwd:
        command = [sys.executable, str(REPO / "train.py"), "-m", "prefix.length=8,16", "learning_rate=1e-2,2e-2"]
        command += [*JOB, f"max_steps={steps}", f"save_steps={steps}", f"dataset.cache_dir={cache}", *extra]
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per side (alternating)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        one_sweep([], Path(cache), 1)  # warm-up: tokenises into the cache once, so neither side pays for it
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side, extra in SIDES.items():
                times[side].append(one_sweep(extra, Path(cache), args.steps))
    load = os.getloadavg()
    base = statistics.median(times[next(iter(SIDES))])
    loads = " / ".join(f"{x:.2f}" for x in load)
    print(f"4-job sweep, {args.steps} steps a job, {os.cpu_count()} cores, load average {loads}\n")
    print("| launcher | runs (s) | median (s) | speed-up |\n|---|---|---|---|")
    for side, runs in times.items():
        median = statistics.median(runs)
        print(f"| {side} | {', '.join(f'{t:.1f}' for t in runs)} | {median:.1f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
