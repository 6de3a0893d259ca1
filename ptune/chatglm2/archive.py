"""What a ``torch.save`` shard holds, read from its zip directory and its pickle only: no tensor data is read.

A torch archive is an uncompressed zip: ``<name>/data.pkl`` (the pickled dict, each tensor a reference to a
storage record with its offset, shape and stride) and one ``<name>/data/<key>`` record per storage. Unpickling
``data.pkl`` with an Unpickler that knows only the handful of globals a dict of tensors uses, each bound to a
recorder here, gives every tensor's dtype, shape and storage without torch and without touching the records.
``torch.load`` to the meta device (or with ``mmap``) reads no data either (27 KB read of an 816 MB shard, against
7 KB here), but needs torch's import (0.9 s) and accepts a record cut short inside an intact zip. Anything else in
the pickle is refused, as ``torch.load(weights_only=True)`` would refuse it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

from ptune.chatglm2.layout import ITEM_BYTES, TensorSpec

# torch's storage classes as they are named in the pickle -> the dtype of their elements
_STORAGES = {"HalfStorage": "float16", "BFloat16Storage": "bfloat16", "FloatStorage": "float32",
             "DoubleStorage": "float64", "CharStorage": "int8", "ByteStorage": "uint8", "ShortStorage": "int16",
             "IntStorage": "int32", "LongStorage": "int64", "BoolStorage": "bool"}  # fmt: skip


class Storage(NamedTuple):
    key: str
    dtype: str
    numel: int


class StoredTensor(NamedTuple):
    """A tensor as the pickle describes it: a view (offset, shape, stride in elements) of one storage record."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.storage.dtype, self.shape)

    def elements_needed(self) -> int:
        """Elements of the storage the view reaches: the last one it addresses, plus one (0 for an empty view)."""
        if 0 in self.shape:
            return 0
        return self.offset + 1 + sum((size - 1) * step for size, step in zip(self.shape, self.stride, strict=True))


def _rebuild_tensor(storage, offset, shape, stride, *_ignored) -> StoredTensor:
    if not isinstance(storage, Storage) or len(shape) != len(stride):
        raise pickle.UnpicklingError(f"a tensor of shape {shape} with stride {stride} on {storage!r}")
    return StoredTensor(storage, int(offset), tuple(map(int, shape)), tuple(map(int, stride)))


def _rebuild_parameter(data, *_ignored):
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """``data.pkl`` into ``{name: StoredTensor}``: the globals a state dict uses map to recorders, others refused."""

    _GLOBALS = {
        ("collections", "OrderedDict"): dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[module, name]
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain dict of tensors")

    def persistent_load(self, pid) -> Storage:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or dtype not in _STORAGES.values():
            raise pickle.UnpicklingError(f"persistent id {pid!r} is not a torch storage")
        return Storage(str(key), dtype, int(numel))


def check_archive(path: Path) -> list[zipfile.ZipInfo]:
    """The zip's members, from its central directory at the very end of the file: reading it (no tensor is loaded)
    catches a file cut by even a few bytes, which the size check before a load tolerates."""
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
    return members


def read_tensors(path: Path) -> tuple[dict[str, StoredTensor], dict[str, int]]:
    """Every tensor the shard's pickle names, and the bytes each storage record (by key) holds in the zip."""
    members = check_archive(path)
    pickled = next(m for m in members if m.filename.endswith("data.pkl"))
    prefix = pickled.filename.removesuffix("data.pkl") + "data/"
    records = {m.filename.removeprefix(prefix): m.file_size for m in members if m.filename.startswith(prefix)}
    try:
        with zipfile.ZipFile(path) as archive, archive.open(pickled) as stream:
            tensors = _HeaderUnpickler(stream).load()
    except Exception as err:  # a garbled pickle raises UnpicklingError, EOFError, KeyError, TypeError ...
        raise ValueError(f"{path}: its data.pkl is not a dict of tensors ({err}): corrupt; download it again") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, StoredTensor) for t in tensors.values()):
        raise ValueError(f"{path}: its data.pkl is not a dict of tensors: corrupt or not a checkpoint")
    return tensors, records


def storage_problems(path: Path, tensors: dict[str, StoredTensor], records: dict[str, int]) -> list[str]:
    """Exact sizes: each storage record holds the bytes its pickle entry declares, and each tensor fits its
    storage. A record cut or padded inside an intact zip shows here, and nowhere else before a load."""
    problems = []
    for name, tensor in sorted(tensors.items()):
        storage = tensor.storage
        declared = storage.numel * ITEM_BYTES[storage.dtype]
        found = records.get(storage.key)
        if found is None:
            problems.append(f"{path}: {name}: its data record data/{storage.key} is missing from the archive")
        elif found != declared:
            problems.append(
                f"{path}: {name}: data record data/{storage.key} holds {found:,} bytes, expected {declared:,} "
                f"({storage.numel:,} {storage.dtype}): truncated or corrupt"
            )
        elif tensor.elements_needed() > storage.numel:
            problems.append(
                f"{path}: {name}: {tensor.spec} at offset {tensor.offset} reaches past its storage of "
                f"{storage.numel:,} elements: corrupt"
            )
    return problems
