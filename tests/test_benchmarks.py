"""The prepared GPU check runs end to end on CPU with a tiny model (so it cannot rot while no GPU is lent)."""

from __future__ import annotations

import importlib.util
import json
import math

from tests.conftest import REPO


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_on_cpu(tmp_path, capsys):
    gpu_check = load_gpu_check()
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    cases = {(r["micro"], r["checkpointing"]) for r in result["train"]}
    assert cases == {(4, False), (1, False), (4, True), (1, True)}  # micro-batch n x 1 against 1 x n, both ways
    for case in result["train"]:
        assert math.isfinite(case["first_loss"]) and math.isfinite(case["last_loss"])
        assert case["seconds"] > 0 and case["mfu"] > 0 and case["estimate_gib"] > 0
    assert result["generate"]["new_tokens"] == 4 * 16  # every prompt got its 16 new tokens
    printed = capsys.readouterr().out
    assert "| bf16 | 4 x 1 | no |" in printed and "new tokens/s" in printed
    assert "int4 base:" in printed or "| int4 |" in printed
