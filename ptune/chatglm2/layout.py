"""What an original ChatGLM2 checkpoint holds, from its config.json alone: every tensor's name, dtype and shape.

The one place that knows the original layout, so ``ptune verify`` (every tensor of every shard), the size checks
before a load and the ``query_key_value`` split agree. Saved quantized (config.json ``quantization_bit``, as the
original ``quantization.py`` stores it), each layer's four linear weights are int8 ``[out, in]`` (int8) or
``[out, in / 2]`` (int4, two values per byte) with a ``weight_scale`` ``[out]`` in the model's dtype (fp16 in every
published download); everything else is in ``torch_dtype``.
"""

from __future__ import annotations

from math import prod
from typing import NamedTuple

ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1, "int16": 2,
              "int32": 4, "int64": 8, "bool": 1}  # fmt: skip

QUANTIZED_WEIGHTS = ("self_attention.query_key_value.weight", "self_attention.dense.weight",
                     "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")  # fmt: skip


class TensorSpec(NamedTuple):
    """A tensor as stored: dtype by torch's name without ``torch.`` (``float16``, ``int8``) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEM_BYTES[self.dtype]

    def __str__(self) -> str:
        return f"{self.dtype} [{', '.join(map(str, self.shape))}]"


def attention_rows(config: dict) -> tuple[int, int]:
    """Rows of q and of each of k and v in the fused ``query_key_value`` (multi-query: ``multi_query_group_num``
    heads of ``kv_channels`` for k and v)."""
    q = config["num_attention_heads"] * config["kv_channels"]
    kv = config["multi_query_group_num"] * config["kv_channels"] if config.get("multi_query_attention") else q
    return q, kv


def _model_dtype(config: dict) -> str:
    dtype = str(config.get("torch_dtype") or "float16").removeprefix("torch.")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"config.json: torch_dtype={dtype!r}; ChatGLM2 is saved in float16, bfloat16 or float32")
    return dtype


def _layer_tensors(config: dict, dtype: str) -> dict[str, TensorSpec]:
    """One layer's tensors, by their name inside ``transformer.encoder.layers.N.``."""
    h, f = config["hidden_size"], config["ffn_hidden_size"]
    q, kv = attention_rows(config)
    linears = dict(zip(QUANTIZED_WEIGHTS, [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)], strict=True))
    bits = config.get("quantization_bit")
    tensors = {
        "input_layernorm.weight": TensorSpec(dtype, (h,)),
        "post_attention_layernorm.weight": TensorSpec(dtype, (h,)),
    }
    for name, (rows, columns) in linears.items():
        if bits:
            tensors[name] = TensorSpec("int8", (rows, columns * bits // 8))
            tensors[f"{name}_scale"] = TensorSpec(dtype, (rows,))
        else:
            tensors[name] = TensorSpec(dtype, (rows, columns))
    if config.get("add_qkv_bias", True):
        tensors["self_attention.query_key_value.bias"] = TensorSpec(dtype, (q + 2 * kv,))
    return tensors


def expected_tensors(config: dict) -> dict[str, TensorSpec]:
    """Every tensor an original checkpoint of this config holds, with its dtype and shape."""
    dtype = _model_dtype(config)
    h, v = config["hidden_size"], config["padded_vocab_size"]
    tensors = {
        "transformer.embedding.word_embeddings.weight": TensorSpec(dtype, (v, h)),
        # the rotary embedding covers half of each head's channels, one frequency per pair
        "transformer.rotary_pos_emb.inv_freq": TensorSpec(dtype, (config["kv_channels"] // 4,)),
    }
    layer = _layer_tensors(config, dtype)
    for number in range(config["num_layers"]):
        tensors |= {f"transformer.encoder.layers.{number}.{name}": spec for name, spec in layer.items()}
    tensors["transformer.encoder.final_layernorm.weight"] = TensorSpec(dtype, (h,))
    tensors["transformer.output_layer.weight"] = TensorSpec(dtype, (v, h))
    return tensors
