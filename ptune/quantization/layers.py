"""A quantized frozen base: weight-only int8 / int4 (the original ChatGLM2 scheme) and bitsandbytes NF4.

``model.quantization`` replaces the linear layers of the attention and MLP blocks (every ``nn.Linear`` but the
output layer); embeddings, norms and the output layer stay in ``model.dtype``, the prefix stays fp32.

int8 / int4 are our own small layer, not a library's, for two reasons: byte-exact compatibility with the
published ChatGLM2 INT4/INT8 checkpoints (``chatglm2-6b-int4``), whose layout no library reads, and one code path
that runs on a CPU as on CUDA (the original's kernels are CUDA-only). The scheme, per output row, in fp16:

    scale = absmax(row) / (2^(bits-1) - 1)      one fp16 scale per row
    q     = round(W / scale)                    int8, in [-127, 127] or [-7, 7]
    int4: byte j of a row = (q[2j] << 4) | (q[2j+1] & 15)

and back, ``W = q * scale`` (the high nibble arithmetically shifted, the low one sign-extended), exact in fp32
(``ptune.quantization.kernels``). An all-zero row gets scale 0 and q 0 (the original divides 0 by 0 there). The
forward pass runs a fused weight-only kernel for a few bf16 rows (decode steps) and otherwise dequantizes the weight
and multiplies; the backward pass dequantizes it again for the input's gradient only (the base is frozen), so
between the passes nothing but the packed bytes is kept.

nf4 is bitsandbytes' 4-bit NormalFloat (QLoRA's format; bitsandbytes runs on CPU since 0.48), quantized after
loading rather than through transformers' ``quantization_config``: that path does not exist for original ChatGLM2
folders, which ptune builds itself, and one way for every model is simpler. What we found about the Trainer:
it refuses to train a model whose ``is_quantized`` is set ("purely quantized models") unless adapters are
attached; the model it gets is our ``PrefixTunedModel``, which has no such attribute, so neither route trips
it, and the trainable prefix is what the check asks for. The one trap is bitsandbytes' CPU inference shortcut,
which repacks a weight in place the first time it runs without gradients (the trainer's evaluation) into a
layout whose kernel has no backward pass: we turn it off (``support_avx512bf16_for_cpu``), which also keeps the
frozen base bit-for-bit the same through training.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ptune.quantization import kernels

QUANTIZATIONS = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4}
INSTALL_HINT = "pip install -e '.[quant]' (bitsandbytes>=0.48; make setup installs it)"


def check_quantization(value: str | None) -> str | None:
    """``model.quantization`` as given: null/none for a full-precision base, else one of :data:`QUANTIZATIONS`."""
    if value in (None, "none", "null"):
        return None
    if value not in QUANTIZATIONS:
        raise ValueError(
            f"model.quantization={value!r} is not supported; use one of null (none), {', '.join(QUANTIZATIONS)}"
        )
    return value


# -- the scheme ---------------------------------------------------------------------------------------------------
def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of a ``[rows, columns]`` weight: int8 ``q`` (int4: two columns per byte), fp16 ``scale``."""
    if bits == 4 and weight.shape[-1] % 2:
        raise ValueError(
            f"int4 packs two columns per byte, but this {tuple(weight.shape)} weight has an odd number of columns; "
            "use model.quantization=int8 or nf4 for this model"
        )
    w = weight.to(torch.float16)
    scale = w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
    q = torch.round(w / torch.where(scale == 0, 1, scale)[:, None]).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values per byte: column 2j in the high nibble, column 2j+1 in the low one."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 15)


class _QuantizedMatmul(torch.autograd.Function):
    """``x @ W.T + b``: a fused kernel for few bf16 rows, else the exact path; the backward pass always the exact
    path, for ``x`` only (the weight is frozen). See ``ptune.quantization.kernels``."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, layer):
        ctx.save_for_backward(qweight, scale)
        ctx.bits = layer.bits
        fused = layer.fused(x) if kernels.wants_kernel(x) else None
        if fused is None:
            return kernels.exact_linear(x, qweight, scale, layer.bits, bias)
        out = fused(x.reshape(-1, x.shape[-1]), scale).reshape(*x.shape[:-1], -1)
        return out if bias is None else out + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        grad_x = kernels.exact_input_grad(grad, qweight, scale, ctx.bits) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer holding ``weight`` (int8, packed for int4) and ``weight_scale`` (fp16), named as in
    the original ChatGLM2 checkpoints; the device is wherever these tensors are (CPU or CUDA)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        packed = torch.empty(out_features, in_features * bits // 8, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float16, device=device), False)
        empty_bias = torch.empty(out_features, dtype=dtype, device=device)
        self.bias = nn.Parameter(empty_bias, requires_grad=False) if bias else None
        self._fused: tuple[tuple, kernels.FusedWeight | None] | None = None  # (weight's identity, kernel view)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        module = cls(
            linear.in_features, linear.out_features, bits, linear.bias is not None, linear.weight.dtype, "meta"
        )
        q, scale = quantize_rows(linear.weight.detach(), bits)
        module.weight, module.weight_scale = nn.Parameter(q, False), nn.Parameter(scale, False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedMatmul.apply(x, self.weight, self.weight_scale, self.bias, self)

    def fused(self, x: torch.Tensor) -> kernels.FusedWeight | None:
        """The fused kernel's view of the weight, derived at the first call that wants it (so a run that never
        decodes never holds it) and again only when the weight is replaced or moved."""
        key = (self.weight.data_ptr(), self.weight.device, self.weight._version)
        if self._fused is None or self._fused[0] != key:
            self._fused = key, kernels.derive_fused(self.weight.detach(), self.bits)
        return self._fused[1]

    @property
    def derived_bytes(self) -> int:
        """Bytes of the kernel's derived copy, if one is held (0 before the first decode step or without one)."""
        return self._fused[1].derived_bytes if self._fused and self._fused[1] else 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}"


# -- the model ----------------------------------------------------------------------------------------------------
def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers that quantization replaces: every ``nn.Linear`` but the output layer."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def with_empty_quantized_linears(model: nn.Module, bits: int, dtype: torch.dtype) -> set[str]:
    """Swap the linear layers of a model on the meta device for empty :class:`QuantizedLinear` ones (to be
    filled by ``load_state_dict(assign=True)``); return their names."""
    names = quantizable_linears(model)
    for name in names:
        old = model.get_submodule(name)
        _replace(model, name, QuantizedLinear(old.in_features, old.out_features, bits, old.bias is not None, dtype))
    return set(names)


def _no_cpu_kernel_download(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _bitsandbytes():
    """bitsandbytes, imported only when nf4 is asked for. On CPUs with AVX512-BF16 its import tries to fetch an
    optional kernel from the Hub (``kernels`` package) and warns when it cannot; that kernel serves only the CPU
    inference shortcut we turn off (module docstring), so the warning says nothing a ptune user can act on."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_cpu_kernel_download)
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"model.quantization=nf4 needs bitsandbytes, which is not importable ({err}): {INSTALL_HINT}"
        ) from None
    return bitsandbytes


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    bnb = _bitsandbytes()
    weight = linear.weight.detach()
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        quant_type="nf4",
        compress_statistics=True,  # QLoRA's double quantization of the block scales
        device="meta",
    )
    module.support_avx512bf16_for_cpu = False  # see the module docstring: no in-place repacking at evaluation
    params = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True, module=module)
    module.weight = params.to(weight.device)  # quantizes, on the weight's own device
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return module


def quantize_model(model: nn.Module, quantization: str) -> nn.Module:
    """Quantize a loaded model's linear layers in place, one at a time (peak memory: the model plus one layer)."""
    quantization = check_quantization(quantization)
    if quantization == "nf4":
        _bitsandbytes()  # fail before touching the model
    for name in quantizable_linears(model):
        linear = model.get_submodule(name)
        new = _nf4_linear(linear) if quantization == "nf4" else QuantizedLinear.from_linear(linear, BITS[quantization])
        _replace(model, name, new)
    return model


def model_quantization(model: nn.Module) -> str | None:
    """What a loaded model's linear layers are: int8, int4, nf4 or None (what a checkpoint records)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            return f"int{module.bits}"
        if type(module).__name__ == "Linear4bit" and getattr(module.weight, "quant_type", None) == "nf4":
            return "nf4"
    return None
