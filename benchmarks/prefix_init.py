"""Eval loss after 50, 100 and 200 steps for ``prefix.init=random|text|vocab``: medians of 3 seeds, on two set-ups.

Usage: ``flock /tmp/ptune-cpu.lock .venv/bin/python benchmarks/prefix_init.py [--shared ../shared] [--seeds 3]``

- ``default``: the built-in default (``models/tiny-glm``, ``data/synthetic_adgen``) as ``train.py`` runs it;
- ``advertisegen``: the real AdvertiseGen rows and the real ChatGLM2 tokenizer from ``--shared`` (skipped without it)
  with a randomly initialised ChatGLM2-shaped model in the original layout (2 layers, hidden 64, 4 heads of 16
  channels, 2 key/value groups, the real 65,024-token vocabulary), small enough for a 2-core CPU.

Every run is ``ptune.training.recipe.train`` on the composed Hydra config (the same 16-position prefix, learning
rate, batch and data for the three starts; the seed sets the data order, the random table and the vocabulary draw),
evaluated on the same validation rows every 50 steps. ``text`` starts from ``TEXT`` (an instruction for the task).
A benchmark, not a test: it prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

INITS = ("random", "text", "vocab")
TEXT = "根据商品的属性写一段广告文案，突出款式、材质和风格的特点："  # "write an ad from the product's attributes: ..."
COMMON = [
    "trainer.per_device_train_batch_size=4",
    "trainer.gradient_accumulation_steps=1",
    "trainer.logging_steps=50",
    "trainer.report_to=[none]",
    "trainer.save_total_limit=1",
    "max_train_samples=800",
    "max_eval_samples=64",
    "torch_threads=2",
    "+trainer.disable_tqdm=true",
]


def chatglm2_folder(shared: Path, folder: Path) -> Path:
    """A random ChatGLM2-shaped model in the original layout with the real tokenizer and config flags."""
    import torch

    from tests.chatglm2.test_conversion import random_original_weights, write_original_folder

    config = json.loads((shared / "models/chatglm2-6b-files/config.json").read_text())
    config |= {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "kv_channels": 16}
    config |= {"ffn_hidden_size": 172, "multi_query_group_num": 2}
    torch.manual_seed(0)
    return write_original_folder(
        folder, config, random_original_weights(config), shared / "models/chatglm2-6b-files/tokenizer.model"
    )


def run(overrides: list[str], work: Path, steps: tuple[int, ...]) -> dict[int, float]:
    from ptune.training.recipe import train
    from tests.conftest import compose_train

    out = Path(tempfile.mkdtemp(dir=work))
    cfg = compose_train(*COMMON, f"max_steps={max(steps)}", f"save_steps={min(steps)}", *overrides)
    train(cfg, str(out))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    return {step: losses[step] for step in (0, *steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", default="50,100,200")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    steps = tuple(int(s) for s in args.steps.split(","))
    work = Path(tempfile.mkdtemp(prefix="prefix-init-"))
    setups = {"default": [f"dataset.cache_dir={work / 'cache'}"]}
    if (args.shared / "data/advertisegen/dev.json").is_file():
        model = chatglm2_folder(args.shared, work / "chatglm2-random")
        setups["advertisegen"] = [
            *setups["default"],
            "model=chatglm2-6b",
            f"model.path={model}",
            "model.dtype=float32",
            "dataset=advertisegen",
            f"dataset.dir={args.shared / 'data/advertisegen'}",
            "dataset.train_file=train_5k.json",
            "dataset.max_target_length=64",
        ]
    else:
        print(f"{args.shared}: no AdvertiseGen rows, that set-up is skipped")
    results: dict[tuple[str, str], list[dict[int, float]]] = {}
    for name, overrides in setups.items():
        for seed in range(args.seeds):
            for init in INITS:  # alternating, so a drift in the machine touches every start alike
                extra = [f"seed={seed}", f"prefix.init={init}"] + (
                    [f"prefix.init_text='{TEXT}'"] if init == "text" else []
                )
                results.setdefault((name, init), []).append(run(overrides + extra, work, steps))
                print(f"{name} seed {seed} {init}: {results[name, init][-1]}", flush=True)
    print(f"\n{platform.machine()} {os.cpu_count()} cores, {datetime.date.today()}, load {os.getloadavg()}")
    print(f"eval loss, median of {args.seeds} seeds\n")
    print("| set-up | init | " + " | ".join(f"step {s}" for s in (0, *steps)) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in (0, *steps)) + " |")
    for (name, init), runs in results.items():
        cells = [f"{statistics.median(r[s] for r in runs):.3f}" for s in (0, *steps)]
        print(f"| {name} | {init} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
