"""ChatGLM2-6B as downloaded, on today's transformers: its architecture is the native ``GlmForCausalLM``.

The original folder (``config.json`` with model_type ``chatglm``, ``tokenizer.model``, ``pytorch_model-*.bin``
shards and an index) needs its remote code, which no longer runs. Here its config is translated field by field,
its weights renamed and split (``query_key_value`` -> q/k/v), and its tokenizer rebuilt, with no code from it.
Loading converts shard by shard into a model allocated once, so peak host memory stays near one copy.

The published quantized variants (``chatglm2-6b-int4``: ``quantization_bit`` in config.json, one
``pytorch_model.bin``, each layer's four linear weights as packed int8 with a ``weight_scale``) load the same way
into ``ptune.quantization.layers.QuantizedLinear`` layers, never dequantized as a whole; an fp16 folder loads quantized
(int8/int4) the same way, each weight quantized as its shard arrives.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

from ptune.chatglm2.files import check_files, read_config, shard_files, stored_quantization
from ptune.chatglm2.layout import TensorSpec, attention_rows, expected_tensors
from ptune.quantization.layers import BITS, quantize_model, quantize_rows, with_empty_quantized_linears
from ptune.utils.durable import staged_folder, user_file_mode

logger = logging.getLogger(__name__)

# Original flags whose other values would change the function; refused rather than silently mis-computed.
REQUIRED_FLAGS = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
}


def is_original_chatglm2(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "chatglm"


def glm_config(original: dict) -> GlmConfig:
    """The native config for an original ChatGLM2 config (every field set: GlmConfig's defaults are GLM-4's)."""
    for key, value in REQUIRED_FLAGS.items():
        if original.get(key, value) != value:
            raise NotImplementedError(f"ChatGLM config has {key}={original[key]}; ptune supports only {key}={value}")
    if original.get("rope_ratio", 1) != 1:
        raise NotImplementedError(
            f"ChatGLM config has rope_ratio={original['rope_ratio']} (a 32k-context variant); its rotary scaling is "
            "not supported, and converting it as rope_ratio=1 would silently compute something else"
        )
    if original.get("pre_seq_len"):
        raise NotImplementedError("this config carries pre_seq_len: convert the base model, then import the prefix")
    heads = original["num_attention_heads"]
    return GlmConfig(
        vocab_size=original["padded_vocab_size"],
        hidden_size=original["hidden_size"],
        intermediate_size=original["ffn_hidden_size"],
        num_hidden_layers=original["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=original["multi_query_group_num"] if original.get("multi_query_attention") else heads,
        head_dim=original["kv_channels"],
        # rotary on the first half of each head's channels, interleaved pairs, base 10000
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        rms_norm_eps=original["layernorm_epsilon"],
        attention_bias=original["add_qkv_bias"],
        attention_dropout=original.get("attention_dropout", 0.0),
        max_position_embeddings=original["seq_length"],
        pad_token_id=original.get("pad_token_id", 0),
        eos_token_id=original.get("eos_token_id", 2),
        bos_token_id=None,
        tie_word_embeddings=False,
        dtype=original.get("torch_dtype", "float16"),
    )


def chatglm2_config(native: dict) -> dict:
    """The original ChatGLM2 config.json for a native GLM config (what ``glm_config`` inverts), for tools that read
    the original's keys; refused, naming the key, where the native model computes something ChatGLM2 cannot."""
    config = GlmConfig.from_dict(native)
    rope = config.rope_parameters or {}
    wanted = {
        "rope_parameters.rope_type": (rope.get("rope_type"), "default"),
        "rope_parameters.rope_theta": (rope.get("rope_theta"), 10000.0),
        "rope_parameters.partial_rotary_factor": (rope.get("partial_rotary_factor"), 0.5),
        "attention_bias": (config.attention_bias, True),
        "tie_word_embeddings": (config.tie_word_embeddings, False),
        "hidden_act": (config.hidden_act, "silu"),
    }
    for key, (value, needed) in wanted.items():
        if value != needed:
            raise NotImplementedError(f"{key}={value}: ChatGLM2 has {needed}; this GLM is not ChatGLM2-shaped")
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        **REQUIRED_FLAGS,
        "multi_query_attention": True,  # the original's prefix has multi_query_group_num groups in any case
        "multi_query_group_num": config.num_key_value_heads,
        "num_attention_heads": config.num_attention_heads,
        "kv_channels": config.head_dim,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.intermediate_size,
        "padded_vocab_size": config.vocab_size,
        "seq_length": config.max_position_embeddings,
        "layernorm_epsilon": config.rms_norm_eps,
        "attention_dropout": config.attention_dropout,
        "hidden_dropout": 0.0,
        "torch_dtype": str(config.dtype or "float16").removeprefix("torch."),
        "tie_word_embeddings": False,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def _split_qkv(
    path: Path, name: str, tensor: torch.Tensor, expected: TensorSpec, rows: tuple[int, int]
) -> tuple[torch.Tensor, ...]:
    """q, k, v rows of a fused ``query_key_value`` weight, bias or weight_scale, its shape checked first: a wrong
    one would fail inside ``torch.split`` naming neither the file nor the tensor."""
    if tuple(tensor.shape) != expected.shape:
        raise ValueError(
            f"{path}: {name} has shape {tuple(tensor.shape)}, expected {expected.shape} by config.json: the file is "
            "of another model or corrupt; ptune verify lists every such tensor"
        )
    q_rows, kv_rows = rows
    return torch.split(tensor, [q_rows, kv_rows, kv_rows], dim=0)


def convert_tensors(path: Path, tensors: dict[str, torch.Tensor], original: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Native names and tensors for the original ones of the shard at ``path`` (named in errors), by its original
    config.json; ``query_key_value`` is split by rows into q, k, v."""
    expected, rows = expected_tensors(original), attention_rows(original)
    for name, tensor in tensors.items():
        if name == "transformer.rotary_pos_emb.inv_freq":
            continue  # recomputed by the native rotary embedding
        if name in _TOP:
            yield _TOP[name], tensor
            continue
        match = _LAYER.fullmatch(name)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {name!r} in a ChatGLM2 checkpoint")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _RENAMES:
            yield prefix + _RENAMES[rest], tensor
        elif rest.endswith("_scale") and rest.removesuffix("_scale") in _RENAMES:  # a quantized weight's scales
            yield prefix + _RENAMES[rest.removesuffix("_scale")] + "_scale", tensor
        elif rest.startswith("self_attention.query_key_value.") and name in expected:
            kind = rest.rsplit(".", 1)[1]  # weight, weight_scale or bias
            q, k, v = _split_qkv(path, name, tensor, expected[name], rows)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                yield f"{prefix}self_attn.{proj}.{kind}", part.contiguous()
        else:
            raise ValueError(f"{path}: unexpected tensor {name!r} in a ChatGLM2 checkpoint")


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a .bin is a pickle; only tensors are accepted. mmap: no second copy while converting.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError ... for a damaged archive
        raise ValueError(f"{path}: cannot be read as a torch archive ({err}); download it again") from None


def _loadable(
    path: Path, tensors: Iterator[tuple[str, torch.Tensor]], quantized: set[str], bits: int, stored: bool, dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Native tensors as the model holds them: quantized layers' weights int8 (quantized here unless ``stored``)
    with fp16 scales, everything else in ``dtype``."""
    for name, tensor in tensors:
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            if stored != (tensor.dtype == torch.int8):
                raise ValueError(
                    f"{path}: {name} is {tensor.dtype}, but config.json says "
                    f"{f'quantization_bit {bits}' if stored else 'no quantization_bit'}: the file does not match it"
                )
            if stored:
                yield name, tensor
            else:
                q, scale = quantize_rows(tensor, bits)
                yield name, q
                yield f"{name}_scale", scale
        elif kind == "weight_scale":
            yield name, tensor.to(torch.float16)
        else:
            yield name, tensor.to(dtype)


def load_chatglm2(folder: str | Path, dtype: torch.dtype, quantization: str | None = None) -> GlmForCausalLM:
    """The original folder as a native model, shard by shard (peak memory: the model plus one shard).

    ``quantization`` int8/int4 quantizes each layer weight as it is read, nf4 the loaded model; a folder saved
    quantized loads as it was saved (any other ``quantization`` is refused: it cannot be re-quantized)."""
    folder = Path(folder)
    check_files(folder)
    original = read_config(folder)
    config = glm_config(original)
    stored = stored_quantization(folder)
    if stored and quantization not in (None, stored):
        raise ValueError(
            f"{folder}: its weights are saved quantized to {stored} (config.json quantization_bit), so they cannot "
            f"be loaded as model.quantization={quantization}; use {stored} or null, or the fp16 download"
        )
    bits = BITS.get(stored or quantization)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
        quantized = with_empty_quantized_linears(model, bits, dtype) if bits else set()
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    expected = set(shapes)
    loaded: set[str] = set()
    for shard in shard_files(folder):
        path = folder / shard
        tensors = convert_tensors(path, _load_shard(path), original)
        converted = dict(_loadable(path, tensors, quantized, bits or 0, stored is not None, dtype))
        unknown = set(converted) - expected
        if unknown:
            raise ValueError(f"{path}: tensors that do not fit the model: {sorted(unknown)[:5]}")
        wrong = [f"{n} {tuple(t.shape)}, not {tuple(shapes[n])}" for n, t in converted.items() if t.shape != shapes[n]]
        if wrong:
            raise ValueError(f"{path}: does not match {folder / 'config.json'}: {'; '.join(wrong[:3])}")
        model.load_state_dict(converted, strict=False, assign=True)
        loaded |= set(converted)
    missing = expected - loaded
    if missing:
        raise ValueError(f"{folder}: the shards lack {sorted(missing)[:5]} (and {max(0, len(missing) - 5)} more)")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # inv_freq was on the meta device
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    if quantization == "nf4":
        quantize_model(model, "nf4")
    return model.eval()


def _publish_modes(folder: Path) -> None:
    """Give every file the mode the umask gives a new file: safetensors' ``save_file`` creates its files 0600, which
    would make a shared ``/models`` folder unreadable to everyone else."""
    mode = user_file_mode()
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def convert_folder(src: str | Path, dst: str | Path) -> None:
    """Write a native GLM folder (safetensors shards, index, config, tokenizer) from an original ChatGLM2 one.

    Written whole or not at all (``staged_folder``): a failure leaves no partial folder."""
    from ptune.chatglm2.tokenizer import save_chatglm2_tokenizer

    src, dst = Path(src), Path(dst)
    check_files(src)
    if stored_quantization(src):
        raise ValueError(f"{src}: saved quantized; ptune loads it as it is (model.path=...), convert the fp16 download")
    original = read_config(src)
    config = glm_config(original)
    with staged_folder(dst) as staging:
        names: dict[str, str] = {}
        total = 0
        shards = shard_files(src)
        for number, shard in enumerate(shards, 1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            converted = dict(convert_tensors(src / shard, _load_shard(src / shard), original))
            save_file(converted, str(staging / name), metadata={"format": "pt"})
            names.update(dict.fromkeys(converted, name))
            total += sum(t.numel() * t.element_size() for t in converted.values())
            logger.info("converted %s -> %s", shard, name)
        index = {"metadata": {"total_size": total}, "weight_map": names}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        config.save_pretrained(staging)
        GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(staging)
        save_chatglm2_tokenizer(src / "tokenizer.model", staging)
        _publish_modes(staging)
