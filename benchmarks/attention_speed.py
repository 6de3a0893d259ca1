"""Masked attention of packed rows with a prefix, forward + backward, in SDPA's kernels (CPU or GPU).

Usage: ``.venv/bin/python benchmarks/attention_speed.py [--shape wide|default] [--dtype bfloat16|float32]``

One layer's attention as ptune trains it (``ptune.model.prefix``): 5 packed sequences of 256 tokens (2 rows each and
a padding tail, as 8 AdvertiseGen rows pack), a 128-position prefix visible to every row, each row causal over
itself only (the block-diagonal mask), the shapes of benchmarks/train_speed.py (``wide``: 16 heads x 128, 2
key/value groups; ``default``: 8 heads x 64). Variants:

- ``SDPA's own kernel``: what transformers calls (key/value heads repeated, boolean mask): the flash kernel on CPU;
- ``math kernel``: the same call under ``sdpa_kernel(SDPBackend.MATH)`` (on a CPU it computes in fp32);
- ``GQA, no repeat``: ``enable_gqa=True`` instead of repeating the key/value heads;
- ``per packed row``: one SDPA call per row, over the prefix and that row only (no work on masked blocks).

Prints the median of 5 timings of forward and backward (after one warm-up) and the largest difference of the
output and of the gradients from the first variant's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"wide": (16, 2, 128), "default": (8, 2, 64)}  # heads, key/value heads, head_dim
SEQUENCES, LENGTH, PREFIX = 5, 256, 128
ROWS = [[140, 110, 6], [130, 120, 6], [150, 100, 6], [125, 125, 6], [160, 70, 26]]  # row lengths per sequence


class Attention:
    """Inputs of one layer's attention and the variants computing it."""

    def __init__(self, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str) -> None:
        self.heads, self.dim = heads, dim
        make = lambda *shape: torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
        self.query = make(SEQUENCES, heads, LENGTH, dim)
        self.key, self.value = make(SEQUENCES, kv_heads, LENGTH, dim), make(SEQUENCES, kv_heads, LENGTH, dim)
        self.prefix = torch.randn(2, kv_heads, PREFIX, dim, device=device, requires_grad=True)  # fp32, as trained
        self.grad_out = torch.randn(SEQUENCES, heads, LENGTH, dim, dtype=dtype, device=device)
        row = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(r)])[None] for r in ROWS]).to(device)
        pos = torch.cat([torch.cat([torch.arange(n) for n in r])[None] for r in ROWS]).to(device)
        real = (row[:, :, None] == row[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
        prefix_columns = torch.ones(SEQUENCES, LENGTH, PREFIX, dtype=torch.bool, device=device)
        self.mask = torch.cat([prefix_columns, real], -1)[:, None]

    def inputs(self) -> list[torch.Tensor]:
        return [self.query, self.key, self.value, self.prefix]

    def keys_values(self, batch: int, rows: slice = slice(None), span: slice = slice(None)):
        prefix = self.prefix.to(self.key.dtype)[:, None].expand(-1, batch, -1, -1, -1)
        return (torch.cat([prefix[i], t[rows, :, span]], 2) for i, t in enumerate((self.key, self.value)))

    def repeat(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.heads // t.shape[1], dim=1)

    def sdpa(self) -> torch.Tensor:
        key, value = self.keys_values(SEQUENCES)
        return F.scaled_dot_product_attention(self.query, self.repeat(key), self.repeat(value), attn_mask=self.mask)

    def math(self) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return self.sdpa()

    def gqa(self) -> torch.Tensor:
        key, value = self.keys_values(SEQUENCES)
        return F.scaled_dot_product_attention(self.query, key, value, attn_mask=self.mask, enable_gqa=True)

    def per_row(self) -> torch.Tensor:
        sequences = []
        for s, lengths in enumerate(ROWS):
            start, out = 0, []
            for n in lengths:
                span = slice(start, start + n)
                key, value = self.keys_values(1, slice(s, s + 1), span)
                mask = torch.ones(n, PREFIX + n, dtype=torch.bool, device=key.device).tril(PREFIX)
                query = self.query[s : s + 1, :, span]
                out.append(F.scaled_dot_product_attention(query, self.repeat(key), self.repeat(value), attn_mask=mask))
                start += n
            sequences.append(torch.cat(out, 2))  # the rows fill their sequence in order
        return torch.cat(sequences, 0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(attention: Attention, variant, repeats: int = 5):
    """Median forward and backward seconds; the output and the gradients of the last run."""
    times = []
    for i in range(repeats + 1):
        for t in attention.inputs():
            t.grad = None
        sync()
        start = time.perf_counter()
        out = variant()
        sync()
        middle = time.perf_counter()
        out.backward(attention.grad_out)
        sync()
        if i:  # the first run warms up
            times.append((middle - start, time.perf_counter() - middle))
    grads = [t.grad.float() for t in attention.inputs()]
    return statistics.median(f for f, _ in times), statistics.median(b for _, b in times), out.float(), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="wide")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = Attention(*SHAPES[args.shape], getattr(torch, args.dtype), device)
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"{args.shape} shape {SHAPES[args.shape]}, {args.dtype}, {device} ({capability}; native bf16 kernels: "
        f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}), torch {torch.__version__}, {torch.get_num_threads()} "
        "threads\n"
    )
    print("| variant | forward (ms) | backward (ms) | total (ms) | vs SDPA's own | max output diff | max grad diff |")
    print("|---|---|---|---|---|---|---|")
    variants = [
        ("SDPA's own kernel", attention.sdpa),
        ("math kernel", attention.math),
        ("GQA, no repeat", attention.gqa),
        ("per packed row", attention.per_row),
    ]
    reference = None
    for name, variant in variants:
        forward, backward, out, grads = measure(attention, variant)
        reference = reference or (forward + backward, out, grads)
        total, ref_out, ref_grads = reference
        out_diff = (out - ref_out).abs().max().item()
        grad_diff = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads, strict=True))
        print(
            f"| {name} | {1e3 * forward:.1f} | {1e3 * backward:.1f} | {1e3 * (forward + backward):.1f} | "
            f"{(forward + backward) / total:.2f}x | {out_diff:.2g} | {grad_diff:.2g} (relative) |"
        )


if __name__ == "__main__":
    main()
