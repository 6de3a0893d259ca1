"""Benchmark scripts run end to end on CPU with tiny settings, so they cannot rot: the prepared GPU check, the
serve benchmark's in-process scheduler runs, wide model and table numbers, the prefix-start comparison, and the
join-cost comparison of source trees; settings a benchmark cannot measure are refused by name."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

from ptune.frontends.common import compose_frontend_config, load_model
from ptune.inference.generation import GenerationSettings, encode_prompt, generate_ids
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, compose_train


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_on_cpu(tmp_path, capsys):
    gpu_check = load_benchmark("gpu_check")
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


def test_serve_throughput_drives_the_scheduler_alone_in_each_mode(tmp_path):
    train(compose_train(*FAST, "max_steps=2", "save_steps=2", cache_dir=tmp_path / "cache"), str(tmp_path / "run"))
    for kind, size in (("continuous", 1), ("continuous", 4), ("static", 4)):
        command = [sys.executable, "benchmarks/serve_throughput.py", "--scheduler-run", kind, str(size)]
        command += [str(tmp_path / "run" / "checkpoint-2"), "--scheduler-clients", "4", "--requests", "8"]
        done = subprocess.run([*command, "--max-tokens", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert float(done.stdout.strip().splitlines()[-1]) > 0  # generated tokens/s


def test_join_cost_times_turns_in_a_worker_of_the_tree(tmp_path):
    train(compose_train(*FAST, "max_steps=2", "save_steps=2", cache_dir=tmp_path / "cache"), str(tmp_path / "run"))
    command = [sys.executable, "benchmarks/join_cost.py", "--tree", f"here={REPO}", "--rounds", "1", "--turns", "3"]
    command += ["--checkpoint", str(tmp_path / "run" / "checkpoint-2"), "--batch", "3", "--joiners", "1", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| here |")]
    assert [row[1] for row in rows] == ["1", "2"]  # one row per joiner count, each with its numbers
    for row in rows:
        assert all(float(cell) >= 0 for cell in row[2:5]) and row[5] == "1.00x"  # the first tree is the baseline


def test_prefix_init_compares_the_three_starts_on_the_default(tmp_path, capsys):
    prefix_init = load_benchmark("prefix_init")
    assert prefix_init.main(["--seeds", "1", "--steps", "2,4", "--shared", str(tmp_path)]) == 0  # no AdvertiseGen
    printed = capsys.readouterr().out
    assert "no AdvertiseGen rows, that set-up is skipped" in printed
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| default |")]
    assert [row[1] for row in rows] == ["random", "text", "vocab"]
    for row in rows:  # eval losses at steps 0, 2 and 4, each a number
        assert [float(cell.strip(" |")) > 0 for cell in row[2:]] == [True] * 3


def test_serve_throughput_wide_model_is_chatglm2_shaped_and_answers(tmp_path):
    serve_throughput = load_benchmark("serve_throughput")
    folder = serve_throughput.wide_model(tmp_path / "wide")
    config = json.loads((folder / "config.json").read_text())
    assert {key: config[key] for key in serve_throughput.WIDE} == serve_throughput.WIDE
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == 425  # the built-in tokenizer's
    loaded = load_model(compose_frontend_config([f"model.path={folder}"]))  # as ptune chat loads a bare base
    [(index, ids)] = generate_ids(loaded, [encode_prompt(loaded, "类型#裙")], GenerationSettings(max_new_tokens=4), 1)
    assert index == 0 and len(ids) <= 4


def test_quantization_benchmark_refuses_one_step_by_name():
    """One step has nothing to time (the first step is set-up): refused before any model is built, naming
    --steps, not a median of nothing behind a worker's CalledProcessError. A real run of all four variants costs
    a minute of CPU, too much for the suite."""
    done = subprocess.run(
        [sys.executable, "benchmarks/quantization.py", "--steps", "1"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--steps 1: at least 2 (the first step includes one-time set-up and is not timed)" in done.stderr


def test_serve_throughput_prints_plain_numbers_never_exponents():
    cell = load_benchmark("serve_throughput").cell
    assert cell(1560.4, 1240.0) == "1,560 (1.26x)"  # tokens/s: not 1.56e+03
    assert cell(11207.0, 1897.0) == "11,200 (5.91x)"
    assert [cell(v, v) for v in (151.3, 27.64, 0.037, 0.4651)] == [
        "151 (1.00x)",
        "27.6 (1.00x)",
        "0.037 (1.00x)",
        "0.465 (1.00x)",
    ]
