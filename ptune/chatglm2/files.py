"""Original ChatGLM2 files: which tensors a folder holds, their sizes, archive structure and published SHA256.

Cheap checks run before every load (each shard present, of the size its tensors imply by config.json, with a
complete zip directory), so a truncated or mismatched download fails at once with the file's name; ``ptune
verify`` adds the SHA256 of every shard against a shipped manifest.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

INDEX_FILE = "pytorch_model.bin.index.json"
SINGLE_FILE = "pytorch_model.bin"  # the quantized downloads: one file, no index
MANIFEST_DIR = Path(__file__).with_name("manifests")


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def stored_quantization(folder: str | Path) -> str | None:
    """``int4`` / ``int8`` for a folder saved quantized (config.json ``quantization_bit``), else None."""
    bits = read_config(Path(folder)).get("quantization_bit")
    if bits in (None, 0, 16):
        return None
    if bits not in (4, 8):
        raise NotImplementedError(f"{Path(folder) / 'config.json'}: quantization_bit={bits}; ptune reads 4 and 8")
    return f"int{bits}"


def weight_map(folder: Path) -> dict[str, str]:
    """Original tensor name -> file: from the index, or every tensor the config implies in one file."""
    if (folder / INDEX_FILE).is_file():
        return json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    return dict.fromkeys(original_tensor_names(read_config(folder)), SINGLE_FILE)


def shard_files(folder: Path) -> list[str]:
    return sorted(set(weight_map(folder).values()))


_QUANTIZED_WEIGHTS = ("query_key_value.weight", "self_attention.dense.weight", "dense_h_to_4h.weight",
                      "dense_4h_to_h.weight")  # fmt: skip


def original_tensor_names(config: dict) -> list[str]:
    """Every tensor an original checkpoint of this config holds (for a single-file folder, which has no index)."""
    names = ["transformer.embedding.word_embeddings.weight", "transformer.rotary_pos_emb.inv_freq"]
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attention.query_key_value.weight",
                 "self_attention.dense.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"]  # fmt: skip
    if config.get("quantization_bit"):
        per_layer += [f"{name}_scale" for name in per_layer if name.endswith(_QUANTIZED_WEIGHTS)]
    if config.get("add_qkv_bias", True):
        per_layer.append("self_attention.query_key_value.bias")
    for layer in range(config["num_layers"]):
        names += [f"transformer.encoder.layers.{layer}.{name}" for name in per_layer]
    return [*names, "transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"]


def _tensor_bytes(name: str, config: dict) -> int:
    """Size in bytes of an original tensor from the config alone: fp16 (or the config's torch_dtype); with
    ``quantization_bit`` the layers' linear weights packed in int8 plus one fp16 scale per row."""
    h, f, v = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    kv = config["multi_query_group_num"] * config["kv_channels"] if config.get("multi_query_attention") else h
    q = config["num_attention_heads"] * config["kv_channels"]
    bits = config.get("quantization_bit")
    element = 4 if config.get("torch_dtype") == "float32" else 2
    linear = dict(zip(_QUANTIZED_WEIGHTS, [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)], strict=True))
    for suffix, (rows, columns) in linear.items():
        if bits and name.endswith(f"{suffix}_scale"):
            return rows * 2
        if name.endswith(suffix):
            return rows * columns * bits // 8 if bits else rows * columns * element
    others = {
        "word_embeddings.weight": v * h,
        "output_layer.weight": v * h,
        "layernorm.weight": h,
        "query_key_value.bias": q + 2 * kv,
        "inv_freq": config["kv_channels"] // 4,
    }
    for suffix, count in others.items():
        if name.endswith(suffix):
            return count * element
    raise ValueError(f"unexpected tensor {name!r} in the index")


def expected_shard_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of tensor data each shard must hold, from the index (if any) and config (no shard is opened)."""
    folder = Path(folder)
    config = read_config(folder)
    sizes: dict[str, int] = {}
    for name, shard in weight_map(folder).items():
        sizes[shard] = sizes.get(shard, 0) + _tensor_bytes(name, config)
    return sizes


# A torch.save archive adds a pickle and per-tensor zip headers (with alignment) to the raw tensor bytes.
ARCHIVE_OVERHEAD = 64 * 1024 + 4096  # bytes allowed beyond the tensor data, per shard plus per tensor


def check_archive(path: Path) -> None:
    """A torch.save file is a zip archive whose central directory sits at its very end: reading it (no tensor is
    loaded) catches a file cut by even a few bytes, which the size check tolerates."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"{path}: not a complete torch archive ({err}): truncated or corrupt; download it again"
        ) from None
    size = path.stat().st_size
    if not any(m.filename.endswith("data.pkl") for m in members) or any(
        m.header_offset + m.compress_size > size for m in members
    ):
        raise ValueError(f"{path}: its zip directory does not describe a torch archive: corrupt; download it again")


def check_files(folder: str | Path) -> None:
    """Cheap checks before any loading: every shard exists, has the size its tensors imply and a complete zip
    directory. Shards come from the index, or for a single-file folder (the quantized downloads) from config."""
    folder = Path(folder)
    for needed in ("config.json", "tokenizer.model"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder}: {needed} is missing; is this a complete ChatGLM2-6B download?")
    if not (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).is_file():
        raise FileNotFoundError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE}; is this a complete download?")
    listed = "named in " + (INDEX_FILE if (folder / INDEX_FILE).is_file() else "config.json's layout")
    counts: dict[str, int] = {}
    for shard in weight_map(folder).values():
        counts[shard] = counts.get(shard, 0) + 1
    quantized = f" (quantization_bit {read_config(folder)['quantization_bit']})" if stored_quantization(folder) else ""
    for shard, data_bytes in expected_shard_bytes(folder).items():
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing ({listed}); download it again")
        size = path.stat().st_size
        if not data_bytes <= size <= data_bytes + ARCHIVE_OVERHEAD * counts[shard]:
            raise ValueError(
                f"{path}: {size:,} bytes, but its tensors alone take {data_bytes:,} by config.json{quantized}: the "
                "file is truncated, corrupt or of another model; download it again (ptune verify checks SHA256 too)"
            )
        check_archive(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def known_manifest(folder: str | Path) -> dict[str, str] | None:
    """The published SHA256 values of a known model's shards, if this folder's index matches one shipped."""
    names = set(shard_files(Path(folder)))
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
