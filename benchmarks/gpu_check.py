"""GPU check: ptune's training step on a ChatGLM2-6B-shaped model, in one prepared run (< 8 min on an H100/H200).

Usage: ``.venv/bin/python benchmarks/gpu_check.py`` (one CUDA GPU); ``--device cpu --tiny`` runs the same code on
a model of a few thousand parameters in seconds (the test suite does, so the script cannot rot).

What it does, all in one process:
1. the GPU's bf16 matmul peak, measured (best of a few 8192^3 matmuls), the denominator of the utilisation;
2. a randomly initialised ``GlmForCausalLM`` with ChatGLM2-6B's real config (``../shared/models/chatglm2-6b-files/
   config.json`` when present, else the same shape written in ``ptune.training.estimate``) in bf16, with a 128-position
   prefix (ptune's ``PrefixTunedModel``, chunked output layer and loss);
3. 20 AdamW steps of the reference layout (rows of 64 prompt + 128 answer tokens + eos, 16 rows per step) for each
   of: micro-batch 16 x 1 and 1 x 16, with and without gradient checkpointing; and, when ``ptune.quantization.layers``
   provides ``quantize_model(model, "int4")``, the same on an int4 base;
4. per case: tokens/s, model FLOP utilisation (the model FLOPs of ``benchmarks/train_speed.py``: 4 x matmul weights
   x tokens + attention, against the peak of step 1), peak GPU memory (``torch.cuda.max_memory_allocated``) next
   to ``ptune estimate``'s figure for the same batch and checkpointing;
5. batched generation: 16 prompts of 64 tokens, 128 new tokens each, greedy, with the prefix: new tokens/s.

The reference recipe (ChatGLM2-6B P-tuning v2, int4 base) published 60 steps x 16 rows in 358 s on an RTX 3090
(2.68 rows/s) at 7.6 GB; the goal for ptune is >= 40% bf16 model FLOP utilisation at micro-batch 16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

REAL_CONFIG = REPO.parent / "shared" / "models" / "chatglm2-6b-files" / "config.json"
SOURCE, TARGET = 64, 128  # the reference layout: 64 prompt tokens, 128 answer tokens, + eos
ROWS_PER_STEP = 16
TINY_LAYOUT = (8, 16, 4)  # --tiny: prompt, answer tokens, rows per step (micro-batch 4 x 1 against 1 x 4)
TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "ffn_hidden_size": 128}


def original_config(tiny: bool) -> tuple[dict, str]:
    from ptune.training.estimate import chatglm2_6b_config

    if REAL_CONFIG.is_file():
        config, source = json.loads(REAL_CONFIG.read_text(encoding="utf-8")), str(REAL_CONFIG)
    else:
        config, source = chatglm2_6b_config(), "ptune.training.estimate.chatglm2_6b_config()"
    if tiny:
        config = {**config, **TINY, "padded_vocab_size": 512, "seq_length": 512}
        source += ", shrunk (--tiny)"
    return config, source


def matmul_peak(device: str, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n bf16 matmul on ``device``."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(config: dict, device: str, prefix_length: int):
    """The random bf16 base (built on the device, no weights file) wrapped with a fresh prefix."""
    from transformers import GlmForCausalLM

    from ptune.chatglm2.conversion import glm_config
    from ptune.model.prefix import PrefixEncoder, PrefixShape, PrefixTunedModel

    hf_config = glm_config(config)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            base = GlmForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default)
    prefix = PrefixEncoder(PrefixShape.from_config(hf_config), prefix_length).to(device)
    return PrefixTunedModel(base, prefix, logits_multiple_of=8)


def model_flops(shape, tokens_per_row: int, rows: int, prefix: int) -> float:
    """Forward + backward-through-activations FLOPs of ``rows`` rows (frozen base: no weight gradients)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    matmul = shape.layers * (h * q + 2 * h * kv + q * h + 3 * h * shape.ffn) + h * shape.vocab
    n = tokens_per_row
    attention = 12 * shape.layers * shape.heads * shape.head_dim * (prefix * n + n * (n + 1) / 2)
    return rows * (4 * matmul * n + attention)


def reference_rows(vocab: int, layout: tuple, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows of the reference layout (prompt, answer, rows); labels on the answer and eos."""
    source, target, rows = layout
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, source + target + 1), generator=gen)
    labels = ids.clone()
    labels[:, :source] = -100
    return ids.to(device), labels.to(device)


def train_case(model, device: str, steps: int, micro: int, checkpointing: bool, vocab: int, layout: tuple) -> dict:
    """``steps`` AdamW steps of a layout's rows as ``micro`` rows x accumulation; timing after one warm-up."""
    if checkpointing:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()
    model.train()
    optimizer = torch.optim.AdamW(model.prefix.parameters(), lr=2e-2)
    ids, labels = reference_rows(vocab, layout, device)
    rows_per_step = layout[2]
    items = torch.tensor(int((labels[:, 1:] != -100).sum()), device=device)

    def step() -> float:
        total = torch.zeros((), device=device)
        for start in range(0, rows_per_step, micro):
            rows = slice(start, start + micro)
            loss = model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=items).loss
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    first = step()  # warm-up: kernel selection, allocator
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        last = step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"seconds": seconds, "first_loss": first, "last_loss": last, "peak_bytes": peak}


def generation_case(model, device: str, vocab: int, layout: tuple) -> dict:
    """Greedy generation of the layout's answer length for its rows' prompts, batched, with the prefix."""
    model.eval()
    ids, _ = reference_rows(vocab, layout, device, seed=1)
    prompts, new_tokens = ids[:, : layout[0]], layout[1]
    with torch.no_grad():
        model.generate(input_ids=prompts, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        sync(device)
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    return {"seconds": seconds, "new_tokens": generated}


def int4_quantizer():
    """``ptune.quantization.layers.quantize_model`` when that module exists (issue "Quantized frozen base"),
    else None."""
    if importlib.util.find_spec("ptune.quantization.layers") is None:
        return None
    import ptune.quantization.layers

    return getattr(ptune.quantization.layers, "quantize_model", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a model of a few thousand parameters (seconds on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per case (default 20; tiny 2)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: use --device cpu --tiny for the CPU smoke run")
    from ptune.training.estimate import ModelShape, estimate

    device, tiny = args.device, args.tiny
    steps = args.steps or (1 if tiny else 20)
    prefix_length = 8 if tiny else 128
    layout = TINY_LAYOUT if tiny else (SOURCE, TARGET, ROWS_PER_STEP)
    source_tokens, target_tokens, rows = layout
    config, source = original_config(tiny)
    shape = ModelShape.from_config(config, name="chatglm2-6b" + (" (tiny)" if tiny else ""))
    peak = matmul_peak(device, 256 if tiny else 8192)
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"device: {gpu}; torch {torch.__version__}; bf16 matmul peak {peak / 1e9:,.0f} GFLOP/s (measured)")
    print(
        f"model: random GlmForCausalLM from {source}: {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}"
    )
    model = build(config, device, prefix_length)
    row_tokens = source_tokens + target_tokens + 1
    flops = model_flops(shape, row_tokens, rows, prefix_length) * steps
    cases = [(micro, ckpt) for ckpt in (False, True) for micro in (rows, 1)]
    results = []
    print(
        f"\n{steps} AdamW steps of {rows} rows x {row_tokens} tokens (prefix {prefix_length}), bf16 base\n"
        "| base | micro-batch | checkpointing | s/step | tokens/s | rows/s | bf16 MFU | peak GPU GiB | estimate GiB |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    quantize = int4_quantizer()
    bases = [("bf16", lambda: model)]
    if quantize is not None:

        def int4_base():  # after the bf16 cases: it quantizes the base in place (the prefix stays fp32)
            quantize(model.base, "int4")
            return model

        bases.append(("int4", int4_base))
    for base_name, make in bases:
        m = make()
        for micro, ckpt in cases:
            r = train_case(m, device, steps, micro, ckpt, shape.vocab, layout)
            est = estimate(shape, batch=micro, seq=row_tokens, prefix=prefix_length, labelled=target_tokens + 1)
            key = "training, gradient checkpointing" if ckpt else "training, no checkpointing"
            est_gib = est.total(key, "fp16/bf16" if base_name == "bf16" else "int4") / 2**30
            mfu = flops / r["seconds"] / peak
            row = {"base": base_name, "micro": micro, "checkpointing": ckpt, "mfu": mfu, "estimate_gib": est_gib, **r}
            results.append(row)
            peak_gib = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "-"
            print(
                f"| {base_name} | {micro} x {rows // micro} | {'yes' if ckpt else 'no'} | "
                f"{r['seconds'] / steps:.3f} | {steps * rows * row_tokens / r['seconds']:,.0f} | "
                f"{steps * rows / r['seconds']:.2f} | {100 * mfu:.1f}% | {peak_gib} | {est_gib:.2f} |",
                flush=True,
            )
    if quantize is None:
        print("int4 base: skipped (ptune.quantization.layers.quantize_model(model, 'int4') is not available)")
    gen = generation_case(m, device, shape.vocab, layout)
    print(
        f"\nbatched generation ({base_name} base): {rows} prompts x {source_tokens} tokens, {target_tokens} new "
        f"tokens each, greedy: {gen['seconds']:.2f} s, {gen['new_tokens'] / gen['seconds']:,.0f} new tokens/s"
    )
    print(
        "reference recipe: 60 steps x 16 rows in 358 s on an RTX 3090, int4 base, 7.6 GB (2.68 rows/s); "
        "goal: >= 40% bf16 MFU at micro-batch 16"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "train": results, "generate": gen}), "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
