"""ptune export-ptuning: the original ChatGLM2 P-tuning layout, read back by import-ptuning bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ptune.checkpoints.format import PREFIX_FILE, checkpoint_metadata, save_prefix_checkpoint
from ptune.cli import main as cli
from ptune.inference.loading import load_checkpoint
from ptune.model.prefix import PrefixEncoder, PrefixShape
from ptune.training.recipe import train
from tests.chatglm2.test_conversion import SMALL, original, original_prefix_state  # noqa: F401  (a fixture)
from tests.conftest import TINY_GLM, llama_dir  # noqa: F401  (a fixture)


def bin_state(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("projection", [False, True])
def test_export_then_import_gives_the_same_prefix_bit_for_bit(fast_cfg, tmp_path, projection):
    run = tmp_path / "run"
    train(fast_cfg("max_steps=2", "save_steps=2", f"prefix.projection={str(projection).lower()}"), str(run))
    trained = run / "checkpoint-2"
    assert cli(["export-ptuning", str(trained), str(tmp_path / "original")]) == 0
    saved = json.loads((tmp_path / "original" / "config.json").read_text())
    assert (saved["pre_seq_len"], saved["prefix_projection"]) == (16, projection)
    assert (saved["num_layers"], saved["multi_query_group_num"], saved["kv_channels"]) == (2, 2, 16)
    back = tmp_path / "back"
    assert cli(["import-ptuning", str(tmp_path / "original"), "--base", str(TINY_GLM), "--out", str(back)]) == 0
    before, after = load_file(str(trained / PREFIX_FILE)), load_file(str(back / PREFIX_FILE))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        logits = [load_checkpoint(c, dtype="float32").model(input_ids=ids).logits for c in (trained, back)]
    assert torch.equal(*logits)


@pytest.mark.parametrize("projection", [False, True])
def test_the_export_is_what_the_original_saved(original, tmp_path, projection):  # noqa: F811
    """An original-format checkpoint imported and exported again: the same keys, shapes and tensors, a plain dict
    that loads with weights_only=True, and config.json = the base's own with pre_seq_len and prefix_projection."""
    folder, config, _ = original
    state = original_prefix_state(config, 6, projection, hidden=SMALL["hidden_size"])
    source = tmp_path / "checkpoint-3000"
    source.mkdir()
    torch.save(state, source / "pytorch_model.bin")  # as the original ptuning/main.py saves it
    assert cli(["import-ptuning", str(source), "--base", str(folder), "--out", str(tmp_path / "ptune")]) == 0
    assert cli(["export-ptuning", str(tmp_path / "ptune"), str(tmp_path / "again")]) == 0
    exported = bin_state(tmp_path / "again")  # weights_only=True: nothing but tensors in it
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(exported[k], state[k]) and exported[k].dtype == state[k].dtype for k in state)
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved == {**config, "pre_seq_len": 6, "prefix_projection": projection}


def _ptune_checkpoint(folder, base, shape: PrefixShape, **options) -> str:
    prefix = PrefixEncoder(shape, length=4, **options)
    save_prefix_checkpoint(folder, prefix, checkpoint_metadata(prefix, base, {}))
    return str(folder)


def test_refusals_name_the_reason_in_one_line(original, llama_dir, tmp_path, capsys):  # noqa: F811
    folder, config, _ = original
    shape = PrefixShape(config["num_layers"], config["multi_query_group_num"], config["kv_channels"])
    wide = _ptune_checkpoint(tmp_path / "wide", folder, shape, projection=True, projection_hidden_size=32)
    llama = _ptune_checkpoint(tmp_path / "llama", llama_dir, PrefixShape(2, 2, 16))
    other_split = _ptune_checkpoint(tmp_path / "split", folder, PrefixShape(config["num_layers"], 4, 8))
    fine = _ptune_checkpoint(tmp_path / "fine", folder, shape)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = {
        (wide, "out1"): "projection_hidden_size=32, but the original's projection is as wide as hidden_size=64",
        (llama, "out2"): "is a 'llama' model; the original P-tuning layout holds ChatGLM2 prefixes only",
        (other_split, "out3"): "multi_query_group_num x kv_channels = 2 x 16",
        (fine, "full"): "full: exists and is not an empty folder",
    }
    for (checkpoint, out), message in cases.items():
        assert cli(["export-ptuning", checkpoint, str(tmp_path / out)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not any((tmp_path / name).exists() for name in ("out1", "out2", "out3"))
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert cli(["export-ptuning", fine, str(tmp_path / "out4")]) == 0


def test_help_lists_export_ptuning():
    result = subprocess.run([sys.executable, "-m", "ptune.cli", "--help"], capture_output=True, text=True, check=True)
    shown = " ".join(result.stdout.split())  # argparse wraps the help
    assert "export-ptuning" in shown and "original P-tuning layout" in shown
