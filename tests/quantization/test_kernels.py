"""The fused weight-only kernels (ptune.quantization.kernels) against the exact fp32 dequantized matmul.

The CUDA int4 kernel cannot run here (no GPU): only its guard (no kernel off sm80+/without the op) is not tested.
"""

from __future__ import annotations

import pytest
import torch

from ptune.quantization import kernels
from ptune.quantization.kernels import FusedWeight, dequantize_rows, derive_fused, int4_cpu_bytes
from ptune.quantization.layers import QuantizedLinear


def _layer(out_features: int, in_features: int, bits: int, seed: int = 0) -> QuantizedLinear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        linear.bias.copy_(torch.randn(out_features, generator=gen))
    return QuantizedLinear.from_linear(linear, bits)


def _reference(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """``x @ W.T`` with the weight dequantized exactly, all in fp64 (no rounding but the inputs')."""
    weight = dequantize_rows(layer.weight, layer.weight_scale, layer.bits, torch.float64)
    return x.double() @ weight.T


# in_features 80 is no multiple of the int4 kernel's 32 (padded); out_features 48 is a multiple of its 16
@pytest.mark.parametrize(("bits", "shape"), [(8, (40, 80)), (4, (48, 80)), (4, (32, 256)), (8, (16, 1024))])
def test_kernels_compute_the_exact_dequantized_matmul(bits, shape):
    layer = _layer(*shape, bits)
    fused = derive_fused(layer.weight, bits)
    assert isinstance(fused, FusedWeight) and fused.kind == f"int{bits}-cpu"
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(1))
    expected = _reference(x, layer)
    out32 = fused(x, layer.weight_scale)  # fp32: the mapping is exact, up to the order of the sum
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    xb = x.bfloat16()
    out = fused(xb, layer.weight_scale)
    assert out.dtype == torch.bfloat16
    expected_b = _reference(xb, layer)  # bf16: the input is bf16, the output rounded (twice: kernel, then scale)
    assert torch.allclose(out.double(), expected_b, rtol=2**-7, atol=1e-3 * expected_b.abs().max().item())


def test_int4_kernel_copy_is_counted_and_int8_reads_the_stored_bytes():
    int4, int8 = _layer(48, 80, 4), _layer(48, 80, 8)
    fused4, fused8 = derive_fused(int4.weight, 4), derive_fused(int8.weight, 8)
    held4 = fused4.weight.numel() * fused4.weight.element_size() + fused4.scales_and_zeros.numel() * 2
    assert fused4.derived_bytes == held4 == int4_cpu_bytes(48, 80) == 48 * 96 // 2 + 3 * 48 * 4
    assert fused8.weight is int8.weight and fused8.derived_bytes == 48 * 2  # the kernel's unit scales only
    assert derive_fused(_layer(40, 80, 4).weight, 4) is None  # out_features % 16: the exact path


def test_layer_takes_the_kernel_for_few_bf16_rows_and_the_exact_path_elsewhere(monkeypatch):
    layer = _layer(48, 80, 4)
    layer.bias.data = layer.bias.data.bfloat16()
    calls = []
    monkeypatch.setattr(FusedWeight, "__call__", lambda self, x, s: calls.append(x.shape) or torch.zeros(len(x), 48))
    with torch.no_grad():
        layer(torch.randn(2, 3, 80).float())  # fp32: exact path
        layer(torch.randn(2, kernels.KERNEL_MAX_ROWS, 80).bfloat16())  # too many rows: exact path
        assert calls == [] and layer.derived_bytes == 0  # nothing derived yet
        layer(torch.randn(2, 3, 80).bfloat16())
    assert calls == [(6, 80)] and layer.derived_bytes == int4_cpu_bytes(48, 80)


def test_decode_rows_through_the_kernel_match_the_exact_path_and_backpropagate_exactly():
    layer = _layer(48, 80, 8)
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_()
    out = layer(x)
    assert layer.derived_bytes > 0  # the kernel ran
    exact = kernels.exact_linear(x.detach(), layer.weight, layer.weight_scale, 8, layer.bias)
    # both routes against fp64: each rounds to bf16 (8 bits) once or twice, inside the sum (a bf16 weight where
    # the CPU multiplies in bf16) or of it (the kernel's unscaled output), so the bound is in the sum's magnitude
    weight64 = dequantize_rows(layer.weight, layer.weight_scale, 8, torch.float64)
    reference = _reference(x.detach(), layer) + layer.bias.double()
    bound = 2**-7 * (x.detach().double().abs() @ weight64.abs().T + layer.bias.double().abs() + reference.abs())
    assert out.dtype == exact.dtype == torch.bfloat16
    assert ((out.double() - reference).abs() <= bound).all() and ((exact.double() - reference).abs() <= bound).all()
    grad = torch.randn(3, 48, generator=torch.Generator().manual_seed(3)).bfloat16()
    out.backward(grad)
    dtype = kernels.exact_matmul_dtype(grad)  # fp32 on a CPU without native bf16, bf16 with it
    weight = dequantize_rows(layer.weight, layer.weight_scale, 8, dtype)
    assert torch.equal(x.grad, (grad.to(dtype) @ weight).bfloat16())  # the exact path, not the kernel


def test_replaced_weights_derive_the_kernel_again():
    layer, other = _layer(48, 80, 4, seed=0), _layer(48, 80, 4, seed=5)
    x = torch.randn(2, 80).bfloat16()
    with torch.no_grad():
        first = layer(x)
        layer.load_state_dict(other.state_dict())  # in place: the same storage, new values
        assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), first)


def test_no_fp16_or_emulated_bf16_arithmetic_on_this_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "_native_bf16_cpu", lambda: False)
    for dtype in (torch.float16, torch.bfloat16):
        assert kernels.exact_matmul_dtype(torch.ones(1, dtype=dtype)) == torch.float32
    monkeypatch.setattr(kernels, "_native_bf16_cpu", lambda: True)
    assert kernels.exact_matmul_dtype(torch.ones(1, dtype=torch.bfloat16)) == torch.bfloat16
    assert kernels.exact_matmul_dtype(torch.ones(1, dtype=torch.float16)) == torch.float32


@pytest.mark.parametrize("bits", [4, 8])
def test_the_fp16_scale_is_not_rounded_to_bf16(bits):
    """Scales exact in fp16 but not in bf16: the kernels' unit scales keep them (bf16 scales would not)."""
    scale = torch.tensor([1 + k * 2**-10 for k in range(1, 17)], dtype=torch.float16)  # between bf16 values
    q = torch.full((16, 32), 7, dtype=torch.int8)
    layer = QuantizedLinear(64 if bits == 4 else 32, 16, bits, False, torch.bfloat16)
    layer.weight.data = q if bits == 8 else torch.full((16, 32), 0x77, dtype=torch.int8)
    layer.weight_scale.data = scale
    x = torch.zeros(1, layer.in_features, dtype=torch.bfloat16)
    x[0, 0] = 1
    with torch.no_grad():
        out = layer(x)
    assert layer.derived_bytes > 0  # through the kernel
    expected = (7 * scale.float()).bfloat16()
    assert torch.equal(out[0], expected)
    assert not torch.equal(out[0], (7 * scale.bfloat16().float()).bfloat16())  # what a bf16 scale would give
