"""Original ChatGLM2 files: which shards a folder holds, their sizes, tensors and published SHA256.

Cheap checks run before every load (each shard present, of about the size its tensors imply by config.json, with
a complete zip directory), so a truncated or mismatched download fails at once with the file's name. ``ptune
verify`` checks every tensor of every shard against what config.json implies (``layout``: name, dtype, shape; the
bytes of its data record exactly), from the shards' zip directories and pickles alone, lists every problem, and
then the SHA256 of every shard against a shipped manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ptune.chatglm2.archive import StoredTensor, check_archive, read_tensors, storage_problems
from ptune.chatglm2.layout import TensorSpec, expected_tensors

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
    return dict.fromkeys(expected_tensors(read_config(folder)), SINGLE_FILE)


def shard_files(folder: Path) -> list[str]:
    return sorted(set(weight_map(folder).values()))


def expected_shard_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of tensor data each shard must hold, from the index (if any) and config (no shard is opened)."""
    folder = Path(folder)
    tensors = expected_tensors(read_config(folder))
    sizes: dict[str, int] = {}
    for name, shard in weight_map(folder).items():
        if name not in tensors:
            raise ValueError(f"{folder / INDEX_FILE}: names {name!r}, which is no tensor of ChatGLM2 by config.json")
        sizes[shard] = sizes.get(shard, 0) + tensors[name].nbytes
    return sizes


# A torch.save archive adds a pickle and per-tensor zip headers (with alignment) to the raw tensor bytes.
ARCHIVE_OVERHEAD = 64 * 1024 + 4096  # bytes allowed beyond the tensor data, per shard plus per tensor


def _check_present(folder: Path) -> None:
    """The files without which nothing else can be checked: config.json, tokenizer.model, an index or one file."""
    for needed in ("config.json", "tokenizer.model"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder}: {needed} is missing; is this a complete ChatGLM2-6B download?")
    if not (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).is_file():
        raise FileNotFoundError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE}; is this a complete download?")


def _missing_shards(folder: Path) -> list[str]:
    """One line per shard named (by the index, or by config.json for a single-file folder) but absent."""
    listed = "named in " + (INDEX_FILE if (folder / INDEX_FILE).is_file() else "config.json's layout")
    return [f"{folder / shard}: missing ({listed}); download it again" for shard in shard_files(folder)
            if not (folder / shard).is_file()]  # fmt: skip


def _quantization_note(config: dict) -> str:
    return f" (quantization_bit {config['quantization_bit']})" if config.get("quantization_bit") else ""


def check_files(folder: str | Path) -> None:
    """Cheap checks before any loading: every shard exists, has about the size its tensors imply and a complete
    zip directory (``ptune verify`` checks every tensor and the sizes exactly). Shards come from the index, or for
    a single-file folder (the quantized downloads) from config."""
    folder = Path(folder)
    _check_present(folder)
    missing = _missing_shards(folder)
    if missing:
        raise FileNotFoundError("\n".join(missing))
    counts: dict[str, int] = {}
    for shard in weight_map(folder).values():
        counts[shard] = counts.get(shard, 0) + 1
    quantized = _quantization_note(read_config(folder))
    for shard, data_bytes in expected_shard_bytes(folder).items():
        path = folder / shard
        size = path.stat().st_size
        if not data_bytes <= size <= data_bytes + ARCHIVE_OVERHEAD * counts[shard]:
            raise ValueError(
                f"{path}: {size:,} bytes, but its tensors alone take {data_bytes:,} by config.json{quantized}: the "
                "file is truncated, corrupt or of another model; download it again (ptune verify checks SHA256 too)"
            )
        check_archive(path)


def _index_problems(folder: Path, expected: dict[str, TensorSpec], mapping: dict[str, str]) -> list[str]:
    if not (folder / INDEX_FILE).is_file():
        return []  # a single-file folder's map is config.json's layout itself
    index = folder / INDEX_FILE
    lacks = [f"{index}: lacks {name}, expected {expected[name]} by config.json" for name in expected
             if name not in mapping]  # fmt: skip
    return lacks + [f"{index}: names {name}, which is no tensor of ChatGLM2 by config.json" for name in mapping
                    if name not in expected]  # fmt: skip


def _shard_problems(path: Path, stored: dict[str, StoredTensor], mapping: dict[str, str], config: dict) -> list[str]:
    """The shard's tensors against those the index puts in it: each there, none more, of the dtype and shape
    config.json implies."""
    expected, note = expected_tensors(config), _quantization_note(config)
    wanted = [name for name, shard in mapping.items() if shard == path.name and name in expected]
    problems = [f"{path}: {name} is missing, expected {expected[name]} by config.json{note}"
                for name in wanted if name not in stored]  # fmt: skip
    for name, tensor in stored.items():
        if name not in expected:
            problems.append(f"{path}: {name} is {tensor.spec}, expected no such tensor by config.json{note}")
        elif mapping.get(name, path.name) != path.name:
            problems.append(f"{path}: {name} is here, but {INDEX_FILE} puts it in {mapping[name]}")
        elif tensor.spec != expected[name]:
            problems.append(f"{path}: {name} is {tensor.spec}, expected {expected[name]} by config.json{note}")
    return problems


def layout_problems(folder: str | Path) -> list[str]:
    """Every way the folder differs from what its config.json implies, one line each naming the file and tensor:
    shards missing or damaged, tensors missing, extra, of another dtype or shape, data records of the wrong size.
    Reads each shard's zip directory and pickle only (``archive.read_tensors``), no tensor data."""
    folder = Path(folder)
    config = read_config(folder)
    mapping = weight_map(folder)
    problems = _index_problems(folder, expected_tensors(config), mapping) + _missing_shards(folder)
    for shard in shard_files(folder):
        path = folder / shard
        if not path.is_file():
            continue
        try:
            stored, records = read_tensors(path)
        except ValueError as err:
            problems.append(str(err))
            continue
        problems += _shard_problems(path, stored, mapping, config) + storage_problems(path, stored, records)
    return problems


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
    """Full check for ``ptune verify``: every tensor's name, dtype, shape and exact size (``layout_problems``),
    then every shard's SHA256 against the shipped manifest. Raises with every problem found, one a line."""
    folder = Path(folder)
    _check_present(folder)
    problems = layout_problems(folder)
    if problems:
        raise ValueError(f"{folder} does not hold what its config.json implies:\n" + "\n".join(problems))
    manifest = known_manifest(folder)
    if manifest is None:
        return [
            f"{folder}: every tensor of {len(shard_files(folder))} shard(s) has the name, dtype, shape and size "
            "config.json implies; no shipped SHA256 manifest matches these shard names, hashes not checked"
        ]
    hashes = {shard: sha256_file(folder / shard) for shard in sorted(manifest)}
    wrong = [f"{folder / shard}: SHA256 {actual} differs from the published {manifest[shard]}; download it again"
             for shard, actual in hashes.items() if actual != manifest[shard]]  # fmt: skip
    if wrong:
        raise ValueError("\n".join(wrong))
    return [f"{shard}: OK" for shard in hashes]
