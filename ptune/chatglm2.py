"""ChatGLM2-6B as downloaded, on today's transformers: its architecture is the native ``GlmForCausalLM``.

The original folder (``config.json`` with model_type ``chatglm``, ``tokenizer.model``, ``pytorch_model-*.bin``
shards and an index) needs its remote code, which no longer runs. Here its config is translated field by field,
its weights renamed and split (``query_key_value`` -> q/k/v), and its tokenizer rebuilt, with no code from it.
Loading converts shard by shard into a model allocated once, so peak host memory stays near one copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

logger = logging.getLogger(__name__)

INDEX_FILE = "pytorch_model.bin.index.json"
MANIFEST_DIR = Path(__file__).with_name("manifests")
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


def convert_tensors(tensors: dict[str, torch.Tensor], config: GlmConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Native names and tensors for original ones; ``query_key_value`` is split by rows into q, k, v."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    for name, tensor in tensors.items():
        if name == "transformer.rotary_pos_emb.inv_freq":
            continue  # recomputed by the native rotary embedding
        if name in _TOP:
            yield _TOP[name], tensor
            continue
        match = _LAYER.fullmatch(name)
        if match is None:
            raise ValueError(f"unexpected tensor {name!r} in a ChatGLM2 checkpoint")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _RENAMES:
            yield prefix + _RENAMES[rest], tensor
        elif rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            q, k, v = torch.split(tensor, [q_rows, kv_rows, kv_rows], dim=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                yield f"{prefix}self_attn.{proj}.{kind}", part.contiguous()
        else:
            raise ValueError(f"unexpected tensor {name!r} in a ChatGLM2 checkpoint")


def _shards(folder: Path) -> list[str]:
    index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    return sorted(set(index["weight_map"].values()))


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a .bin is a pickle; only tensors are accepted. mmap: no second copy while converting.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_chatglm2(folder: str | Path, dtype: torch.dtype) -> GlmForCausalLM:
    """The original folder as a native model, shard by shard (peak memory: the model plus one shard)."""
    folder = Path(folder)
    check_files(folder)
    config = glm_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for shard in _shards(folder):
        converted = {n: t.to(dtype) for n, t in convert_tensors(_load_shard(folder / shard), config)}
        unknown = set(converted) - expected
        if unknown:
            raise ValueError(f"{folder / shard}: tensors that do not fit the model: {sorted(unknown)[:5]}")
        model.load_state_dict(converted, strict=False, assign=True)
        loaded |= set(converted)
    missing = expected - loaded
    if missing:
        raise ValueError(f"{folder}: the shards lack {sorted(missing)[:5]} (and {max(0, len(missing) - 5)} more)")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # inv_freq was on the meta device
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    return model.eval()


def convert_folder(src: str | Path, dst: str | Path) -> None:
    """Write a native GLM folder (safetensors shards, index, config, tokenizer) from an original ChatGLM2 one."""
    from ptune.chatglm2_tokenizer import save_chatglm2_tokenizer

    src, dst = Path(src), Path(dst)
    check_files(src)
    config = glm_config(json.loads((src / "config.json").read_text(encoding="utf-8")))
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    shards = _shards(src)
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        converted = dict(convert_tensors(_load_shard(src / shard), config))
        tmp = dst / f".{name}.tmp"
        save_file(converted, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, dst / name)
        weight_map.update(dict.fromkeys(converted, name))
        total += sum(t.numel() * t.element_size() for t in converted.values())
        logger.info("converted %s -> %s", shard, name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    config.save_pretrained(dst)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(dst)
    save_chatglm2_tokenizer(src / "tokenizer.model", dst)


# -- integrity ---------------------------------------------------------------------------------------------------
def _tensor_bytes(name: str, config: dict) -> int:
    """Size in bytes of an original tensor in the checkpoint's dtype (fp16), from the config alone."""
    h, f, v = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    kv = config["multi_query_group_num"] * config["kv_channels"] if config.get("multi_query_attention") else h
    qkv = config["num_attention_heads"] * config["kv_channels"] + 2 * kv
    shapes = {
        "word_embeddings.weight": v * h,
        "output_layer.weight": v * h,
        "layernorm.weight": h,
        "query_key_value.weight": qkv * h,
        "query_key_value.bias": qkv,
        "self_attention.dense.weight": h * config["num_attention_heads"] * config["kv_channels"],
        "dense_h_to_4h.weight": 2 * f * h,
        "dense_4h_to_h.weight": f * h,
        "inv_freq": config["kv_channels"] // 4,
    }
    element = 4 if config.get("torch_dtype") == "float32" else 2
    for suffix, count in shapes.items():
        if name.endswith(suffix):
            return count * element
    raise ValueError(f"unexpected tensor {name!r} in the index")


def expected_shard_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of tensor data each shard must hold, from the index and config (no shard is opened)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    sizes: dict[str, int] = {}
    for name, shard in index["weight_map"].items():
        sizes[shard] = sizes.get(shard, 0) + _tensor_bytes(name, config)
    return sizes


# A torch.save archive adds a pickle and per-tensor zip headers (with alignment) to the raw tensor bytes.
ARCHIVE_OVERHEAD = 64 * 1024 + 4096  # bytes allowed beyond the tensor data, per shard plus per tensor


def check_files(folder: str | Path) -> None:
    """Cheap checks before any loading: every indexed shard exists and has the size its tensors imply."""
    folder = Path(folder)
    for needed in ("config.json", "tokenizer.model", INDEX_FILE):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder}: {needed} is missing; is this a complete ChatGLM2-6B download?")
    index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    counts: dict[str, int] = {}
    for shard in index["weight_map"].values():
        counts[shard] = counts.get(shard, 0) + 1
    for shard, data_bytes in expected_shard_bytes(folder).items():
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (named in {INDEX_FILE}); download it again")
        size = path.stat().st_size
        if not data_bytes <= size <= data_bytes + ARCHIVE_OVERHEAD * counts[shard]:
            raise ValueError(
                f"{path}: {size:,} bytes, but its tensors alone take {data_bytes:,}: the file is truncated or "
                "corrupt; download it again (ptune verify checks the SHA256 too)"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def known_manifest(folder: str | Path) -> dict[str, str] | None:
    """The published SHA256 values of a known model's shards, if this folder's index matches one shipped."""
    names = set(_shards(Path(folder)))
    for manifest in MANIFEST_DIR.glob("*.json"):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if set(data["sha256"]) == names:
            return data["sha256"]
    return None


def verify(folder: str | Path) -> list[str]:
    """Full check for ``ptune verify``: the cheap checks, then every shard's SHA256 against the shipped manifest."""
    folder = Path(folder)
    check_files(folder)
    manifest = known_manifest(folder)
    if manifest is None:
        return [f"{folder}: sizes fine; no shipped SHA256 manifest matches these shard names, hashes not checked"]
    report = []
    for shard, expected in sorted(manifest.items()):
        actual = sha256_file(folder / shard)
        if actual != expected:
            raise ValueError(f"{folder / shard}: SHA256 {actual} differs from the published {expected}; download again")
        report.append(f"{shard}: OK")
    return report
