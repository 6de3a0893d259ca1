"""What a request joining a running batch costs the batch: the step in which rows join against a plain step, in source
trees compared side by side (issue 21, item 3: prefill inside decode steps; "measure the join cost before and after"):
the running rows' tokens wait for the joiners' prefill, and that wait is what the turn's excess over a plain step shows.

Usage: ``.venv/bin/python benchmarks/join_cost.py --tree base=../base --tree ours=. [--rounds 4] [--wide]
[--checkpoint PATH] [--batch 15] [--joiners 1 4] [--threads 1]`` (on a 2-core VM: ~45 s, with ``--wide`` ~5 min)

Each round runs, per tree in turn, a fresh process of this script with ``PYTHONPATH`` and the working folder set to the
tree, so that it imports that tree's ``ptune``. It uses ``BatchDecoder``'s public API only (``new_row``, ``join``,
``step``, ``remove``), so the same code measures a tree whose ``join`` prefills the joining rows' prompts itself and one
whose next ``step`` prefills them packed with the running rows' tokens: a "turn" is ``join`` of the new rows followed by
one ``step``. The worker keeps ``--batch`` greedy rows decoding (a row that ends is replaced, its prompt prefilled,
outside the timing), then interleaves ``--turns`` times, per joiner count: a plain turn (one ``step``), and a join turn
(``new_row`` for each joiner, built-in dev prompts of 41-62 tokens, ``join``, ``step``) followed by ``remove`` of the
joiners, timed on its own (the leave; the joiners hold the last slots, in today's decoder, so it moves no other row). A
join turn in which a joiner ends at once (a tree that chooses its first token in ``join`` and the step then refuses) is
dropped and counted. Per worker: medians (ms) of each kind of turn; join cost = join turn - plain step. The table gives,
per tree, the medians over rounds of those medians, and each tree's join cost as a ratio to the first tree's.

Without ``--checkpoint`` a prefix is trained briefly (``serve_throughput.train_checkpoint``, once, for all trees) on the
built-in model or, with ``--wide``, on ``serve_throughput.wide_model``'s wider random ChatGLM2-shaped model, whose step
costs its weights' reading rather than Python's dispatch. The temporary folder is kept, and the header names the
checkpoint, so that a rerun can skip the training with ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from serve_throughput import dev_prompts, train_checkpoint, wide_model  # noqa: E402  (the same prompts and models)

WARM_UP_STEPS = 5


def ms(seconds: list[float]) -> float:
    """The median in milliseconds; NaN when every turn of a kind was dropped (the table shows nan, not a crash)."""
    return 1000 * statistics.median(seconds) if seconds else math.nan


def worker(args: argparse.Namespace) -> dict:
    """One tree's measurement, in this process (the tree is the working folder and on ``PYTHONPATH``)."""
    import torch

    import ptune
    from ptune.inference.generation import BatchDecoder, GenerationSettings, Row, encode_prompt
    from ptune.inference.loading import load_checkpoint

    tree = Path.cwd().resolve()
    if not Path(ptune.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"imported {ptune.__file__}, not the tree's ptune ({tree}): is PYTHONPATH set?")
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint)
    prompts = [encode_prompt(loaded, text) for text in dev_prompts()]
    budget = 2 * (WARM_UP_STEPS + 2 * len(args.joiners) * args.turns) + 64  # more steps than any row will see
    running = GenerationSettings(max_new_tokens=budget)  # rows end only by an end token
    joining = GenerationSettings(max_new_tokens=16)
    slots = args.batch + max(args.joiners)
    decoder = BatchDecoder(loaded, (), slots=slots, length=max(map(len, prompts)) + budget)
    refills, arrivals = itertools.cycle(prompts), itertools.cycle(prompts[::-1])

    def settle() -> None:
        """Untimed: ended rows out, new ones in and prefilled (their step taken), until ``batch`` rows run."""
        pending = False
        while True:
            decoder.remove([r for r in decoder.rows if r.finish])
            missing = args.batch - len(decoder.rows)
            if missing:
                decoder.join([decoder.new_row(next(refills), running) for _ in range(missing)])
                pending = True
            elif not pending:
                return
            if not any(r.finish for r in decoder.rows):
                decoder.step()
                pending = False

    settle()
    for _ in range(WARM_UP_STEPS):
        settle()
        decoder.step()
    plain: list[float] = []
    turns: dict[int, list[float]] = {n: [] for n in args.joiners}
    leaves: dict[int, list[float]] = {n: [] for n in args.joiners}
    dropped = 0
    for _ in range(args.turns):
        for count in args.joiners:
            settle()
            start = time.perf_counter()
            decoder.step()
            plain.append(time.perf_counter() - start)
            settle()
            start = time.perf_counter()
            rows: list[Row] = [decoder.new_row(next(arrivals), joining) for _ in range(count)]
            decoder.join(rows)
            if any(r.finish for r in decoder.rows):
                decoder.remove([r for r in decoder.rows if r.finish or r in rows])
                dropped += 1
                continue
            decoder.step()
            turns[count].append(time.perf_counter() - start)
            start = time.perf_counter()
            decoder.remove(rows)
            leaves[count].append(time.perf_counter() - start)
    step = ms(plain)
    joins = {n: {"turn": ms(turns[n]), "cost": ms(turns[n]) - step, "leave": ms(leaves[n])} for n in args.joiners}
    params = [p.numel() for p in loaded.model.parameters()]
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    model = f"{Path(loaded.base_path).name} ({sum(params) / 1e6:.2f}M parameters, {dtype})"
    return {"torch": torch.__version__, "model": model, "plain": step, "joins": joins, "dropped": dropped}


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def parse_tree(value: str) -> tuple[str, Path]:
    label, sep, path = value.partition("=")
    folder = Path(path if sep else label).resolve()
    if not (folder / "ptune").is_dir():
        raise argparse.ArgumentTypeError(f"{folder} holds no ptune package")
    return (label if sep else folder.name), folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=parse_tree, action="append", help="[LABEL=]PATH; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--wide", action="store_true", help="a wider random ChatGLM2-shaped model (see above)")
    parser.add_argument("--checkpoint", type=Path, help="else a prefix trained 30 steps, shared by all trees")
    parser.add_argument("--batch", type=int, default=15, help="rows decoding when others join")
    parser.add_argument("--joiners", type=int, nargs="+", default=[1, 4], help="rows joining at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    parser.add_argument("--turns", type=int, default=60, help=argparse.SUPPRESS)  # per kind, per worker
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not args.tree:
        parser.error("give at least one --tree [LABEL=]PATH")
    load_start = os.getloadavg()
    if args.checkpoint is None:
        work = Path(tempfile.mkdtemp(prefix="ptune-join-bench-"))
        args.checkpoint = train_checkpoint(work, wide_model(work / "wide") if args.wide else None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    options = ["--batch", str(args.batch), "--threads", str(args.threads), "--turns", str(args.turns)]
    options += ["--checkpoint", str(args.checkpoint.resolve()), "--joiners", *map(str, args.joiners)]
    results: dict[str, list[dict]] = {label: [] for label, _ in args.tree}
    for _ in range(args.rounds):
        for label, folder in args.tree:
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", *options]
            done = subprocess.run(
                command, cwd=folder, env={**env, "PYTHONPATH": str(folder)}, capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(f"{label}'s worker failed:\n{done.stderr[-3000:]}")
            results[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    load_end = os.getloadavg()
    first = results[args.tree[0][0]][0]
    loads = " at start, ".join("/".join(f"{x:.2f}" for x in load) for load in (load_start, load_end))
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs ({cpu_model()})"
    print(f"\n{machine}; torch {first['torch']}, {args.threads} thread(s)")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1/5/15 min) {loads} at end")
    print(f"model {first['model']}, checkpoint {args.checkpoint}; {args.batch} rows decoding, greedy")
    print(f"medians over {args.rounds} alternating rounds of each worker's medians of {args.turns} turns per kind\n")
    base = args.tree[0][0]
    print(f"| tree | joiners | plain step ms | join turn ms | join cost ms | cost vs {base} | leave ms | dropped |")
    print("|---|---|---|---|---|---|---|---|")
    for count in args.joiners:
        key = str(count)
        base_cost = statistics.median(r["joins"][key]["cost"] for r in results[base])
        for label, runs in results.items():
            med = {k: statistics.median(r["joins"][key][k] for r in runs) for k in ("turn", "cost", "leave")}
            step, dropped = statistics.median(r["plain"] for r in runs), sum(r["dropped"] for r in runs)
            ratio = med["cost"] / base_cost if base_cost > 0 else math.nan
            cells = [f"{step:.2f}", f"{med['turn']:.2f}", f"{med['cost']:.2f}", f"{ratio:.2f}x", f"{med['leave']:.3f}"]
            print(f"| {label} | {count} | " + " | ".join(cells) + f" | {dropped} |")


if __name__ == "__main__":
    main()
