"""The matmuls of a weight-only int8/int4 layer (the ChatGLM2 scheme): exact dequantization and torch's fused kernels.

**Exact path** (training, prefill, anything with many rows, and every backward pass): ``q * scale`` in fp32 -- the
product of an int8 (at most 8 significant bits) and an fp16 scale (11) is exact in fp32's 24 -- so a model computing
in fp32 gets the original CPU kernel's weights (``extract_int4_weight_to_float`` multiplies in fp32) to the bit, and
one cast to fp16 afterwards gives the original CUDA kernel's fp16 product (IEEE rounds a product once). On a CPU the
matmul itself runs in fp32 unless the CPU has native bf16 (AVX512-BF16 or AMX): without it oneDNN emulates bf16,
and on the 2-core AVX2 machine of the benchmarks a bf16 ``nn.Linear`` over 256 rows of a 5472 x 1024 weight took
0.25 s forward and 6 s forward + backward against 0.04 s and 0.09 s in fp32; fp16 is never multiplied on a CPU.

**Fused kernels** (few rows, the decode steps of generation, ``x`` in bf16): torch's weight-only kernels read the
packed weight instead of a dequantized copy:

- int8, CPU: ``torch._weight_int8pack_mm`` on the stored int8 ``q`` itself (nothing repacked);
- int4, CPU: ``aten._weight_int4pack_mm_for_cpu`` on ``aten._convert_weight_to_int4pack_for_cpu`` of ``q + 8``;
- int4, CUDA: ``aten._weight_int4pack_mm`` on ``aten._convert_weight_to_int4pack`` of the stored bytes XOR 0x88
  (its input packs column 2j in the high nibble like ChatGLM2, unsigned: ``q + 8`` is ``q`` with the nibble's sign
  bit flipped). Not run here (no GPU): it is used only where torch has the ops, the GPU is sm80+ and the shapes
  fit, and a derivation that fails falls back to the exact path with a warning.

The scheme maps onto them exactly: symmetric per-row scales are the kernels' group scales repeated over a row's
groups with zero point 0 (the int4 kernels compute ``(u - 8) * scale + zero`` for an unsigned nibble ``u``). The
kernels take their scales in the input's dtype, and an fp16 scale is not exact in bf16 (8 significant bits), so
they run with scale 1 and the row scale multiplies their output in fp32: the one rounding of the fp16 scale is
avoided, the output is rounded twice (to bf16 by the kernel, then after the scale) instead of once.

Measured on that machine (bf16 input, a 5472 x 1024 weight, ms): 1 row: bf16 matmul 0.7-1.0, fp32 exact path
2.3 + dequantization, int8 kernel 0.3, int4 kernel 0.4; 16 rows: 10, 7-11 + dequantization, 3.7, 3.8; 256 rows:
160-180, 31-37 + 4 (int8) / 11 (int4), 47, 64. Hence :data:`KERNEL_MAX_ROWS`. The int4 CPU layout is a second copy
of the weight (half a byte per value, plus the group scales): :class:`FusedWeight` is derived at the first call
that uses it, so training (whose matmuls have many rows) never holds it, and its bytes are counted
(``QuantizedLinear.derived_bytes``, ``ptune estimate``'s inference row, benchmarks/quantization.py). May import
nothing of ptune.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

KERNEL_MAX_ROWS = 64  # at most this many rows (tokens) go through a fused kernel; more: the exact path
INT4_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernels accept, largest first (fewest group scales)
INT4_CPU_K, INT4_CPU_N = 32, 16  # the CPU int4 kernel wants in_features % 32 (we pad) and out_features % 16
INT4_CUDA_INNER_K_TILES = 8  # tinygemm's layout: in_features % (8 x 16) == 0


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 values of ChatGLM2's int4 bytes: the arithmetic high nibble, then the sign-extended low one."""
    return torch.stack([packed >> 4, (packed << 4) >> 4], dim=-1).flatten(-2)


def dequantize_rows(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale``, exact in fp32, then cast once to ``dtype``."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    weight = q.to(torch.float32) * scale.to(torch.float32)[:, None]
    return weight.to(dtype)


def _native_bf16_cpu() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def exact_matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the exact path multiplies in: the input's on CUDA, fp32 on a CPU unless it has native bf16."""
    if x.device.type != "cpu" or x.dtype == torch.float32:
        return x.dtype
    if x.dtype == torch.bfloat16 and _native_bf16_cpu():
        return x.dtype
    return torch.float32


def exact_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int, bias) -> torch.Tensor:
    """``x @ W.T + b`` with ``W`` dequantized exactly, multiplied in :func:`exact_matmul_dtype`, in ``x.dtype``."""
    dtype = exact_matmul_dtype(x)
    weight = dequantize_rows(qweight, scale, bits, dtype)
    out = nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))
    return out.to(x.dtype)


def exact_input_grad(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``grad @ W``: the input's gradient, through the exact path (the backward pass of every route)."""
    dtype = exact_matmul_dtype(grad)
    return (grad.to(dtype) @ dequantize_rows(qweight, scale, bits, dtype)).to(grad.dtype)


def int4_group(in_features: int) -> int:
    """The largest group size the int4 kernels accept that divides ``in_features`` (already padded to 32)."""
    return next(g for g in INT4_GROUPS if in_features % g == 0)


def int4_cpu_bytes(out_features: int, in_features: int) -> int:
    """Bytes of the CPU int4 kernel's derived copy: the repacked weight (``in_features`` padded to 32) and its
    group scales and zero points (bf16); what ``ptune estimate`` adds for an int4 base."""
    k = -(-in_features // INT4_CPU_K) * INT4_CPU_K
    return out_features * k // 2 + (k // int4_group(k)) * out_features * 2 * 2


@dataclass(frozen=True)
class FusedWeight:
    """A fused kernel's view of one layer's weight, derived once from the stored bytes (see the module docstring)."""

    kind: str  # "int8-cpu", "int4-cpu", "int4-cuda"
    weight: torch.Tensor  # the stored int8 q (int8-cpu) or the kernel's repacked layout
    scales_and_zeros: torch.Tensor | None  # int4: [groups, out_features, 2], scale 1 and zero 0 (bf16)
    ones: torch.Tensor | None  # int8: the kernel's per-row scales, all 1 (bf16)
    in_features: int  # after padding (int4 CPU)
    group: int

    @property
    def derived_bytes(self) -> int:
        """Bytes held beyond the stored ``weight`` and ``weight_scale`` (the int8 kernel reads ``q`` itself)."""
        own = [self.scales_and_zeros, self.ones] + ([self.weight] if self.kind != "int8-cpu" else [])
        return sum(t.numel() * t.element_size() for t in own if t is not None)

    def __call__(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for a 2-d ``x`` (bf16 in use; fp32 for the tests, on CPU), in ``x.dtype``; the row scale
        applied in fp32 (the fp16 scale exactly)."""
        if self.kind == "int8-cpu":
            out = torch._weight_int8pack_mm(x, self.weight, self.ones.to(x.dtype))
        else:
            padded = nn.functional.pad(x, (0, self.in_features - x.shape[-1]))  # zero columns meet zero weights
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.kind == "int4-cpu" else _cuda_int4_mm
            out = mm(padded, self.weight, self.group, self.scales_and_zeros.to(x.dtype))
        return (out.to(torch.float32) * scale.to(torch.float32)).to(x.dtype)


def _cuda_int4_mm(x, packed, group, scales_and_zeros):
    return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)


def _int4_fused(kind: str, packed: torch.Tensor, out_features: int, in_features: int) -> FusedWeight:
    """An int4 kernel's view: its packed weight and unit group scales with zero points 0."""
    group = int4_group(in_features)
    scales_and_zeros = torch.zeros(in_features // group, out_features, 2, dtype=torch.bfloat16, device=packed.device)
    scales_and_zeros[..., 0] = 1
    return FusedWeight(kind, packed, scales_and_zeros, None, in_features, group)


def _int4_cpu(qweight: torch.Tensor) -> FusedWeight | None:
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 2
    if out_features % INT4_CPU_N:
        return None
    padded = -(-in_features // INT4_CPU_K) * INT4_CPU_K
    unsigned = nn.functional.pad(unpack_int4(qweight).to(torch.int32) + 8, (0, padded - in_features), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    return _int4_fused("int4-cpu", packed, out_features, padded)


def _int4_cuda(qweight: torch.Tensor) -> FusedWeight | None:
    """tinygemm's layout (see the module docstring: untested here, so it is guarded)."""
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 2
    shapes_fit = in_features % (INT4_CUDA_INNER_K_TILES * 16) == 0 and out_features % 8 == 0
    if not (shapes_fit and hasattr(torch.ops.aten, "_weight_int4pack_mm")):
        return None
    if torch.cuda.get_device_capability(qweight.device) < (8, 0):
        return None
    try:
        unsigned = qweight.view(torch.uint8) ^ 0x88
        packed = torch.ops.aten._convert_weight_to_int4pack(unsigned, INT4_CUDA_INNER_K_TILES)
    except RuntimeError as err:
        warnings.warn(f"int4 CUDA kernel unavailable ({err}); this layer uses the exact path", stacklevel=3)
        return None
    return _int4_fused("int4-cuda", packed, out_features, in_features)


def derive_fused(qweight: torch.Tensor, bits: int) -> FusedWeight | None:
    """The fused kernel for a stored weight on its device, or None where none applies (the exact path then)."""
    device = qweight.device
    if not qweight.is_contiguous():  # the kernels read rows in place; loaded weights are contiguous
        return None
    if device.type == "cpu" and bits == 8 and hasattr(torch, "_weight_int8pack_mm"):
        ones = torch.ones(qweight.shape[0], dtype=torch.bfloat16)
        return FusedWeight("int8-cpu", qweight, None, ones, qweight.shape[1], 0)
    if device.type == "cpu" and bits == 4 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return _int4_cpu(qweight)
    if device.type == "cuda" and bits == 4:
        return _int4_cuda(qweight)
    return None


def wants_kernel(x: torch.Tensor) -> bool:
    """Whether a matmul of ``x`` goes through a fused kernel: bf16 input, at most :data:`KERNEL_MAX_ROWS` rows."""
    return x.dtype == torch.bfloat16 and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]
