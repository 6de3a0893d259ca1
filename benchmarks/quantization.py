"""Memory and speed of a quantized frozen base, measured: bf16 against int8, int4 (ours) and nf4 (bitsandbytes).

Usage: ``flock /tmp/ptune-bench.lock .venv/bin/python benchmarks/quantization.py [--steps 8] [--repeats 2]``

One randomly initialised GLM shaped like ChatGLM2 (4 layers, hidden 1024, 8 heads of 128 channels, 2 key/value
groups, ffn 2736, partial rotary 0.5, built from the real config's flags by
``ptune.chatglm2.conversion.glm_config``) with a small vocabulary (4,096), so that the layers' linear weights,
which quantization shrinks, are 84% of its parameters. It
is saved once in bf16; every run is a fresh subprocess (``--worker``, so ``ru_maxrss`` is its own) that loads it
through ``ptune.model.base.load_base_model`` with ``model.quantization`` set, puts a 16-position fp32 prefix on it and
trains the prefix for ``--steps`` AdamW steps (lr 5e-2, batch 2 x 128 tokens, bf16 compute) on rows whose tokens
come from a fixed set of 64 (learnable: the prefix shifts the output towards them), then measures the eval loss
on 8 held-out rows. The variants alternate ``--repeats`` times; the table shows medians and ratios to bf16. On CUDA the
model runs there and peak GPU memory is reported too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VARIANTS = ("bf16", "int8", "int4", "nf4")
BATCH = 2  # rows of 128 tokens per step
SHAPE = {
    "num_layers": 4,
    "hidden_size": 1024,
    "num_attention_heads": 8,
    "kv_channels": 128,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 2736,
    "padded_vocab_size": 4096,
}


def build_model(folder: Path) -> None:
    from transformers import GlmForCausalLM

    from ptune.chatglm2.conversion import glm_config
    from ptune.training.estimate import chatglm2_6b_config

    torch.manual_seed(0)
    GlmForCausalLM(glm_config({**chatglm2_6b_config(), **SHAPE})).to(torch.bfloat16).save_pretrained(folder)


def rows(count: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Tokens drawn from a fixed set of 64 (the same for every split): a prefix learns to favour them."""
    allowed = torch.randperm(vocab - 3, generator=torch.Generator().manual_seed(0))[:64] + 3
    return allowed[torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(seed))]


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes a module holds: parameters, buffers and bitsandbytes' quantization state (block scales, codebook)."""
    total = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for sub in module.modules():
        state = getattr(getattr(sub, "weight", None), "quant_state", None)
        if state is not None:
            parts = [v for v in state.as_dict(packed=True).values() if torch.is_tensor(v)]
            total += sum(v.numel() * v.element_size() for v in parts)
    return total


def worker(folder: str, variant: str, steps: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptune.checkpoints.format import build_prefix
    from ptune.model.base import load_base_model
    from ptune.model.prefix import PrefixShape, PrefixTunedModel
    from ptune.quantization.layers import quantizable_linears

    with torch.device("meta"):  # the layers quantization replaces, without loading the model twice
        names = quantizable_linears(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(folder, "bfloat16", None if variant == "bf16" else variant)
    weights = tensor_bytes(base)
    layers = sum(tensor_bytes(base.get_submodule(name)) for name in names)
    torch.manual_seed(0)
    prefix = build_prefix(PrefixShape.from_config(base.config), {"length": 16, "projection": False}, 1024)
    model = PrefixTunedModel(base, prefix).to(device).train()
    vocab = base.config.vocab_size
    train, held = rows(BATCH * steps, 128, vocab, seed=1).to(device), rows(8, 128, vocab, seed=2).to(device)
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=5e-2)

    def eval_loss() -> float:
        with torch.no_grad():
            return model(input_ids=held, labels=held).loss.item()

    before, times = eval_loss(), []
    for step in range(steps):
        batch = train[BATCH * step : BATCH * (step + 1)]
        start = time.perf_counter()
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "weight_bytes": weights,
        "layer_bytes": layers,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "step_s": statistics.median(times[1:]),  # the first step includes one-time kernel set-up
        "eval_before": before,
        "eval_after": eval_loss(),
        "device": device.type,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=6, help="AdamW steps per run, at least 2 (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per variant, at least 1")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first step includes one-time set-up and is not timed)")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        for _ in range(args.repeats):
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--worker", tmp, variant, "--steps", str(args.steps)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:  # its own error, not a bare CalledProcessError
                    raise SystemExit(f"the {variant} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
                results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    gpu = results["bf16"][0]["device"] == "cuda"
    header = "| base | weights MiB | quantized layers MiB | peak RSS MiB |" + (" peak GPU MiB |" if gpu else "")
    lines = [header + " s/step | eval loss (untrained -> trained) |", "|---" * (7 if gpu else 6) + "|"]
    mib = 2**20

    def cell(variant: str, key: str, scale: float = mib, digits: int = 1) -> str:
        value = median(variant, key)
        return f"{value / scale:.{digits}f} ({value / median('bf16', key):.2f}x)"

    for v in VARIANTS:
        cells = [cell(v, "weight_bytes"), cell(v, "layer_bytes"), cell(v, "peak_rss", digits=0)]
        cells += [cell(v, "peak_gpu", digits=0)] if gpu else []
        cells += [cell(v, "step_s", 1, 3), f"{median(v, 'eval_before'):.4f} -> {median(v, 'eval_after'):.4f}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    print(
        f"{datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if gpu else 'CPU'}); medians of {args.repeats} alternating fresh "
        f"processes, {args.steps} steps each; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print("\n".join(lines))
    from ptune.training.estimate import ModelShape, chatglm2_6b_config

    shape = ModelShape.from_config({**chatglm2_6b_config(), **SHAPE})
    print(
        "ptune estimate for this shape, the quantized layers' bytes over bf16 (weights and scales, no biases): "
        + ", ".join(f"{base} {shape.layer_weight_ratio(base):.3f}x" for base in ("int8", "int4"))
    )


if __name__ == "__main__":
    main()
