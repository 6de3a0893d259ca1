"""``ptune verify`` on tampered copies of tiny original ChatGLM2 folders (fp16 with an index, int4 and int8 in one
file): every tensor's name, dtype and shape against config.json, exact record sizes, every problem one line; and a
wrong-sized ``query_key_value`` named with its file when a folder is loaded or converted."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ptune.chatglm2 import files as chatglm2_files
from ptune.chatglm2.archive import read_tensors
from ptune.chatglm2.layout import TensorSpec, expected_tensors
from ptune.cli import main as cli
from ptune.model.base import load_base_model
from tests.chatglm2.test_conversion import (
    REAL,
    original_config,
    random_original_weights,
    sentencepiece_model,
    write_original_folder,
)
from tests.quantization.test_layers import write_quantized_folder

LAYER0 = "transformer.encoder.layers.0."
QKV = LAYER0 + "self_attention.query_key_value."
FIRST, SECOND = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Intact fp16 (two shards and an index), int4 and int8 (one pytorch_model.bin) folders of one tiny config."""
    root = tmp_path_factory.mktemp("verify")
    tokenizer, vocab = sentencepiece_model(root)
    config = original_config(vocab)
    weights = random_original_weights(config)
    found = {"fp16": write_original_folder(root / "fp16", config, weights, tokenizer)}
    for bits in (4, 8):
        write_quantized_folder(root / f"int{bits}", config, weights, tokenizer, bits)
        found[f"int{bits}"] = root / f"int{bits}"
    return found


def tampered(folders: dict[str, Path], kind: str, tmp_path: Path, edit: Callable[[dict], None], shard: str) -> Path:
    """A copy of one folder whose ``shard`` holds its tensors as ``edit`` leaves them."""
    copy = shutil.copytree(folders[kind], tmp_path / kind)
    tensors = torch.load(copy / shard, weights_only=True)
    edit(tensors)
    torch.save(tensors, copy / shard)
    return copy


def problems(folder: Path) -> list[str]:
    with pytest.raises(ValueError) as raised:
        chatglm2_files.verify(folder)
    head, *lines = str(raised.value).splitlines()
    assert head == f"{folder} does not hold what its config.json implies:"
    return lines


def test_intact_folders_pass_and_the_layout_is_what_they_hold(folders):
    for kind, folder in folders.items():
        assert chatglm2_files.verify(folder) == [
            f"{folder}: every tensor of {len(chatglm2_files.shard_files(folder))} shard(s) has the name, dtype, "
            "shape and size config.json implies; no shipped SHA256 manifest matches these shard names, hashes not "
            "checked"
        ], kind
    stored = read_tensors(folders["int4"] / "pytorch_model.bin")[0]
    expected = expected_tensors(chatglm2_files.read_config(folders["int4"]))
    assert {name: tensor.spec for name, tensor in stored.items()} == expected
    assert str(expected[QKV + "weight"]) == "int8 [128, 32]" and str(expected[QKV + "weight_scale"]) == "float16 [128]"


def test_every_tampered_tensor_is_one_line_naming_shard_and_tensor(folders, tmp_path):
    def edit(tensors):
        del tensors[QKV + "weight_scale"]  # a missing scale
        tensors[LAYER0 + "self_attention.dense.weight_scale"] = torch.ones(63, dtype=torch.half)  # [64] expected
        tensors["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"] = torch.zeros(64, 96, dtype=torch.half)
        tensors["transformer.extra.weight"] = torch.zeros(3, dtype=torch.half)  # a tensor ChatGLM2 has not

    folder = tampered(folders, "int8", tmp_path, edit, "pytorch_model.bin")
    shard, note = folder / "pytorch_model.bin", "by config.json (quantization_bit 8)"
    assert problems(folder) == [
        f"{shard}: {QKV}weight_scale is missing, expected float16 [128] {note}",
        f"{shard}: {LAYER0}self_attention.dense.weight_scale is float16 [63], expected float16 [64] {note}",
        f"{shard}: transformer.encoder.layers.1.mlp.dense_4h_to_h.weight is float16 [64, 96], expected int8 [64, 96] "
        f"{note}",
        f"{shard}: transformer.extra.weight is float16 [3], expected no such tensor {note}",
    ]


def _cut_record(path: Path, key: str, cut: int) -> None:
    """Rewrite the archive with storage record ``data/<key>`` shorter by ``cut`` bytes, its zip directory intact."""
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as source, zipfile.ZipFile(path, "w") as target:
        for member in source.infolist():
            data = source.read(member)
            target.writestr(member.filename, data[:-cut] if member.filename.endswith(f"/data/{key}") else data)


def test_a_record_cut_inside_an_intact_zip_and_a_cut_shard_are_both_named(folders, tmp_path):
    folder = shutil.copytree(folders["fp16"], tmp_path / "fp16")
    first, second = folder / FIRST, folder / SECOND
    name, tensor = next(iter(sorted(read_tensors(first)[0].items())))
    _cut_record(first, tensor.storage.key, 100)
    second.write_bytes(second.read_bytes()[:-5000])
    need = tensor.spec.nbytes
    lines = problems(folder)
    assert lines[0] == (
        f"{first}: {name}: data record data/{tensor.storage.key} holds {need - 100:,} bytes, expected {need:,} "
        f"({need // 2:,} float16): truncated or corrupt"
    )
    assert len(lines) == 2 and lines[1].startswith(f"{second}: not a complete torch archive (")


def test_every_missing_shard_is_named(folders, tmp_path, capsys):
    folder = shutil.copytree(folders["fp16"], tmp_path / "fp16")
    (folder / FIRST).unlink()
    (folder / SECOND).unlink()
    missing = [f"{folder / shard}: missing (named in {chatglm2_files.INDEX_FILE}); download it again"
               for shard in (FIRST, SECOND)]  # fmt: skip
    assert problems(folder) == missing
    assert cli(["verify", str(folder)]) == 1
    assert capsys.readouterr().err.splitlines()[1:] == missing
    with pytest.raises(FileNotFoundError) as raised:  # loading names both too
        load_base_model(folder)
    assert str(raised.value).splitlines() == missing


@pytest.mark.parametrize(
    ("kind", "tensor", "found", "expected"),
    [
        ("fp16", "bias", TensorSpec("float16", (127,)), TensorSpec("float16", (128,))),
        ("int4", "weight", TensorSpec("int8", (127, 32)), TensorSpec("int8", (128, 32))),
        ("int8", "weight_scale", TensorSpec("float16", (127,)), TensorSpec("float16", (128,))),
    ],
)
def test_a_wrong_sized_query_key_value_is_named_on_load_and_by_verify(folders, tmp_path, kind, tensor, found, expected):
    """Without the check, loading (and ``ptune convert``) fails inside torch.split with a bare RuntimeError."""
    name = QKV + tensor
    shard = folders[kind] / (FIRST if kind == "fp16" else "pytorch_model.bin")

    def edit(tensors):
        tensors[name] = tensors[name][:-1].clone()

    folder = tampered(folders, kind, tmp_path, edit, shard.name)
    shard = folder / shard.name
    message = f"{shard}: {name} has shape {found.shape}, expected {expected.shape} by config.json: the file is"
    with pytest.raises(ValueError) as raised:
        load_base_model(folder, "float32")
    assert str(raised.value).startswith(message)
    note = "" if kind == "fp16" else f" (quantization_bit {kind[3:]})"
    assert f"{shard}: {name} is {found}, expected {expected} by config.json{note}" in problems(folder)
    if kind == "fp16":  # ptune convert converts with the same function
        assert cli(["convert", str(folder), str(tmp_path / "native")]) == 1
        assert not (tmp_path / "native").exists()


def test_a_garbled_pickle_and_an_index_that_differs_from_the_config_are_named(folders, tmp_path):
    folder = shutil.copytree(folders["fp16"], tmp_path / "fp16")
    first = folder / FIRST
    intact = first.read_bytes()
    with zipfile.ZipFile(first) as archive:  # garble the pickle, keep every size and the zip directory
        pickled = next(m for m in archive.infolist() if m.filename.endswith("data.pkl"))
    start = pickled.header_offset + 30 + len(pickled.filename.encode()) + len(pickled.extra)
    first.write_bytes(intact[:start] + b"\xff" * pickled.file_size + intact[start + pickled.file_size :])
    index_path = folder / chatglm2_files.INDEX_FILE
    index = json.loads(index_path.read_text())
    lost = QKV + "bias"
    shard = index["weight_map"].pop(lost)
    index["weight_map"]["transformer.extra.weight"] = shard
    index_path.write_text(json.dumps(index))
    assert problems(folder)[:3] == [
        f"{index_path}: lacks {lost}, expected float16 [128] by config.json",
        f"{index_path}: names transformer.extra.weight, which is no tensor of ChatGLM2 by config.json",
        f"{first}: its data.pkl is not a dict of tensors (Bad CRC-32 for file '{first.stem}/data.pkl'): corrupt; "
        "download it again",  # zipfile checks the pickle's CRC as it reads it
    ]


def test_the_real_index_names_exactly_the_tensors_the_layout_implies():
    if not (REAL / chatglm2_files.INDEX_FILE).exists():
        pytest.skip("../shared is absent")
    expected = expected_tensors(chatglm2_files.read_config(REAL))
    assert set(chatglm2_files.weight_map(REAL)) == set(expected) and len(expected) == 200
    assert str(expected["transformer.rotary_pos_emb.inv_freq"]) == "float16 [32]"
    assert str(expected[QKV + "weight"]) == "float16 [4608, 4096]"
