"""Time the evaluator's batched generation against a batch-1 loop (the reference's per_device_eval_batch_size 1).

Usage: ``.venv/bin/python benchmarks/generation_speed.py [--rows 256] [--batch-size 32] [--model models/tiny-glm]``

Both sides run in one process on the same model, prefix and rows, greedy; the answers must be identical (checked)
and the table reports generated tokens per second, median of ``--repeats`` alternating runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ptune.checkpoints.format import build_prefix  # noqa: E402
from ptune.data.prompts import PromptFormat  # noqa: E402
from ptune.evaluation.scoring import load_eval_set  # noqa: E402
from ptune.inference.generation import GenerationSettings, encode_prompt, generate_ids  # noqa: E402
from ptune.inference.loading import LoadedModel  # noqa: E402
from ptune.model.base import load_base_model, load_tokenizer  # noqa: E402
from ptune.model.prefix import PrefixShape, PrefixTunedModel  # noqa: E402


def prefixed_model(path: Path, prefix_length: int) -> LoadedModel:
    """The base with a freshly initialised prefix: speed does not depend on what the prefix learned."""
    torch.manual_seed(0)
    base = load_base_model(path)
    prefix = build_prefix(PrefixShape.from_config(base.config), {"length": prefix_length, "projection": False}, 0)
    return LoadedModel(
        model=PrefixTunedModel(base, prefix).eval(),
        tokenizer=load_tokenizer(path),
        prompt_format=PromptFormat(),
        base_path=str(path),
        max_source_length=64,
        max_target_length=128,
    )


def run(loaded: LoadedModel, prompts, settings, batch_size: int) -> tuple[float, dict[int, list[int]]]:
    start = time.perf_counter()
    answers = dict(generate_ids(loaded, prompts, settings, batch_size))
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-glm")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = prefixed_model(args.model, args.prefix_length)
    dataset = {
        "dir": str(REPO / "data" / "synthetic_adgen"),
        "validation_file": "dev.json",
        "prompt_column": "content",
        "response_column": "summary",
    }
    examples = load_eval_set(dataset, args.rows).examples
    prompts = [encode_prompt(loaded, ex.prompt, ex.history) for ex in examples]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    run(loaded, prompts[:4], settings, 4)  # warm-up

    times: dict[str, list[float]] = {"batch 1 loop": [], f"batched ({args.batch_size})": []}
    outputs = {}
    for _ in range(args.repeats):  # alternate the sides so drift affects both alike
        for name, size in (("batch 1 loop", 1), (f"batched ({args.batch_size})", args.batch_size)):
            seconds, outputs[name] = run(loaded, prompts, settings, size)
            times[name].append(seconds)
    first, second = outputs.values()
    assert first == second, "batched generation differs from the batch-1 loop"
    tokens = sum(len(ids) for ids in first.values())

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cores={os.cpu_count()} torch={torch.__version__}"
    )
    print(
        f"model: {args.model} ({sum(p.numel() for p in loaded.model.base.parameters()):,} parameters), prefix "
        f"{args.prefix_length}; {len(prompts)} rows from data/synthetic_adgen/dev.json; greedy, "
        f"max_new_tokens={args.max_new_tokens}; {tokens} tokens generated (identical on both sides)\n"
    )
    baseline = statistics.median(times["batch 1 loop"])
    print(f"| generation | seconds (median of {args.repeats}) | tokens/s | speed-up |")
    print("|---|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:,.0f} | {baseline / seconds:.1f}x |")


if __name__ == "__main__":
    main()
