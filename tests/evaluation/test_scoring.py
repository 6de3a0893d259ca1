"""The evaluator: one generation path, checkpoints scored from their own config, runs and sweeps, bad input."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys

import pytest

import ptune.evaluation.scoring as evaluation
from ptune.checkpoints.format import META_FILE, PREFIX_FILE
from ptune.data.reading import DataError
from ptune.evaluation.metrics import METRIC_NAMES
from ptune.evaluation.report import PLOT_FILE
from ptune.evaluation.scoring import METRICS_FILE, PREDICTIONS_FILE, evaluate_target, load_eval_set, score_predictions
from ptune.inference.generation import GenerationSettings, encode_prompt, generate_answers, generate_ids
from ptune.inference.loading import load_checkpoint
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, compose_config, compose_train, make_tiny_model
from tests.training.test_recipe import run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short real training run of the built-in default: checkpoint-3 and checkpoint-6."""
    root = tmp_path_factory.mktemp("trained")
    train(compose_train(*FAST, "max_steps=30", "save_steps=15", cache_dir=root / "cache"), str(root / "run"))
    return root / "run"


def evaluate_cfg(*overrides: str):
    return compose_config("evaluate", "max_samples=12", "batch_size=4", "metric_processes=1", *overrides)


def test_batched_generation_equals_batch_one_in_input_order(trained_run):
    loaded = load_checkpoint(trained_run / "checkpoint-30")
    examples = load_eval_set(loaded.metadata["config"]["dataset"], 10).examples
    settings = GenerationSettings(max_new_tokens=24)
    prompts = [encode_prompt(loaded, ex.prompt, ex.history) for ex in examples]
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths: padding matters
    one_by_one = [next(generate_ids(loaded, [p], settings, batch_size=1))[1] for p in prompts]
    batched = dict(generate_ids(loaded, prompts, settings, batch_size=4))
    assert [batched[i] for i in range(len(prompts))] == one_by_one
    answers = generate_answers(loaded, examples, settings, batch_size=4)
    assert answers == [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in one_by_one]
    assert any(answers)


def test_sampling_is_an_option_with_a_seed(trained_run):
    loaded = load_checkpoint(trained_run / "checkpoint-30")
    prompts = [encode_prompt(loaded, "类型#裙*颜色#红色")] * 3
    sampled = GenerationSettings(max_new_tokens=16, do_sample=True, seed=7)
    first = dict(generate_ids(loaded, prompts, sampled, batch_size=3))
    assert first == dict(generate_ids(loaded, prompts, sampled, batch_size=3))


def test_checkpoint_round_trip_and_rerun_skips(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    rows = evaluate_target(evaluate_cfg(f"checkpoint={trained_run / 'checkpoint-30'}", f"output_dir={out}"))
    assert [r["step"] for r in rows] == [30]
    lines = [json.loads(x) for x in (out / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 12 and all(set(x) == {"labels", "predict"} for x in lines)
    dev = [json.loads(x) for x in (REPO / "data/synthetic_adgen/dev.json").read_text(encoding="utf-8").splitlines()]
    assert [x["labels"] for x in lines] == [row["summary"] for row in dev[:12]]  # input order
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert set(METRIC_NAMES) <= set(metrics) and metrics["rows"] == 12
    assert metrics["rouge-1"] > 0 and 0 <= metrics["empty_prediction_share"] <= 1
    assert (trained_run / "runs" / "evaluate").is_dir()  # TensorBoard events at the run

    monkeypatch.setattr(evaluation, "generate_ids", lambda *a, **k: pytest.fail("regenerated a scored checkpoint"))
    again = evaluate_target(evaluate_cfg(f"checkpoint={trained_run / 'checkpoint-30'}", f"output_dir={out}"))
    assert again[0]["rouge-l"] == metrics["rouge-l"]
    monkeypatch.undo()
    forced = evaluate_target(
        evaluate_cfg(f"checkpoint={trained_run / 'checkpoint-30'}", f"output_dir={out}", "force=true")
    )
    assert {k: forced[0][k] for k in METRIC_NAMES} == {k: metrics[k] for k in METRIC_NAMES}  # greedy: reproducible


def test_run_folder_gives_table_and_plot(trained_run, tmp_path):
    rows = evaluate_target(evaluate_cfg(f"checkpoint={trained_run}", f"output_dir={tmp_path}"))
    assert [r["step"] for r in rows] == [15, 30]
    table = (tmp_path / "eval_results.md").read_text()
    assert "| run | overrides | step | rouge-1" in table and table.count("\n") == 4
    assert "| generation |" in table and "| greedy, prompt + answer <= 193 tokens |" in table  # what produced it
    assert (tmp_path / "eval_results.csv").read_text().count("\n") == 3
    assert (tmp_path / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "checkpoint-15" / METRICS_FILE).exists()


def test_sweep_folder(trained_run, tmp_path):
    sweep = tmp_path / "sweep"
    for job, length in enumerate((2, 4)):
        run = sweep / str(job)
        cfg = compose_train(*FAST, "max_steps=2", "save_steps=1", f"prefix.length={length}", cache_dir=tmp_path / "c")
        train(cfg, str(run))
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- prefix.length={length}\n")
    rows = evaluate_target(evaluate_cfg(f"checkpoint={sweep}", "max_samples=4"))
    assert [(r["run"], r["step"], r["overrides"]) for r in rows] == [
        ("0", 1, "prefix.length=2"),
        ("0", 2, "prefix.length=2"),
        ("1", 1, "prefix.length=4"),
        ("1", 2, "prefix.length=4"),
    ]
    assert (results_in(sweep) / "eval_results.csv").exists() and (results_in(sweep) / PLOT_FILE).exists()


def test_predictions_only_and_a_bad_line(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    path.write_text(
        json.dumps({"labels": "红色的裙子很好看", "predict": "红色的裙子"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"labels": "简约上衣", "predict": ""}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    metrics = score_predictions(path, processes=1)
    assert metrics["rows"] == 2 and metrics["empty_prediction_share"] == 0.5
    assert json.loads((tmp_path / METRICS_FILE).read_text())["bleu-4"] == metrics["bleu-4"]
    (tmp_path / METRICS_FILE).unlink()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"labels": "x", "predict": \n')
    with pytest.raises(DataError, match=rf"{PREDICTIONS_FILE}:3: not valid JSON"):
        score_predictions(path)
    assert not (tmp_path / METRICS_FILE).exists()


def test_broken_checkpoints_are_named(trained_run, tmp_path):
    empty = tmp_path / "checkpoint-9"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no {META_FILE}"):
        evaluate_target(evaluate_cfg(f"checkpoint={empty}"))
    no_weights = tmp_path / "checkpoint-10"
    no_weights.mkdir()
    (no_weights / META_FILE).write_text((trained_run / "checkpoint-15" / META_FILE).read_text())
    with pytest.raises(FileNotFoundError, match=f"no {PREFIX_FILE}"):
        evaluate_target(evaluate_cfg(f"checkpoint={no_weights}"))
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folders"):
        (tmp_path / "empty-run").mkdir()
        evaluate_target(evaluate_cfg(f"checkpoint={tmp_path / 'empty-run'}"))


def test_prefix_for_another_base_is_refused(trained_run, tmp_path):
    other = make_tiny_model("llama", tmp_path / "mqa-llama", kv_heads=1)
    with pytest.raises(ValueError, match=r"checkpoint-15 was trained on a base .*num_key_value_heads.*model\.path"):
        evaluate_target(evaluate_cfg(f"checkpoint={trained_run / 'checkpoint-15'}", f"model.path={other}"))


def test_eval_set_without_the_columns(trained_run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dev.json").write_text('{"question": "a", "answer": "b"}\n', encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="prompt"):
        evaluate_target(
            evaluate_cfg(
                f"checkpoint={trained_run / 'checkpoint-15'}",
                "dataset=jsonl",
                f"dataset.dir={data}",
                f"output_dir={out}",
            )
        )
    assert not (out / METRICS_FILE).exists()


def test_cli(trained_run, tmp_path):
    out = tmp_path / "cli"
    result = run_cli(
        sys.executable,
        str(REPO / "evaluate.py"),
        f"checkpoint={trained_run / 'checkpoint-15'}",
        "max_samples=4",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / METRICS_FILE).read_text())["rows"] == 4
    bad = run_cli(sys.executable, str(REPO / "evaluate.py"), cwd=tmp_path)
    assert bad.returncode != 0 and "exactly one of checkpoint=PATH or predictions=PATH" in bad.stderr + bad.stdout


def _copy_checkpoint(source, destination, keep_state: bool = True):
    shutil.copytree(source, destination)
    if not keep_state:
        (destination / "trainer_state.json").unlink()
    return destination


def test_checkpoints_not_named_checkpoint_n(trained_run, tmp_path):
    """`ptune import-ptuning` writes checkpoint-3000-ptune (no trainer state); a copy named `best` has no number."""
    imported = _copy_checkpoint(trained_run / "checkpoint-15", tmp_path / "checkpoint-3000-ptune", keep_state=False)
    rows = evaluate_target(evaluate_cfg(f"checkpoint={imported}", "max_samples=2"))
    assert rows[0]["step"] == 3000 and (results_in(imported) / METRICS_FILE).exists()
    best = _copy_checkpoint(trained_run / "checkpoint-30", tmp_path / "run" / "best", keep_state=False)
    assert evaluate_target(evaluate_cfg(f"checkpoint={best}", "max_samples=2"))[0]["step"] is None
    _copy_checkpoint(trained_run / "checkpoint-15", tmp_path / "run" / "checkpoint-15")  # step from trainer state
    rows = evaluate_target(evaluate_cfg(f"checkpoint={tmp_path / 'run'}", "max_samples=2"))
    assert sorted((r["step"] or -1, r["checkpoint"]) for r in rows) == [
        (-1, str(best)),
        (15, str(tmp_path / "run" / "checkpoint-15")),
    ]
    assert "| run | overrides | step |" in (results_in(tmp_path / "run") / "eval_results.md").read_text()


def test_staging_folders_are_never_checkpoints(trained_run, tmp_path):
    run = tmp_path / "run"
    _copy_checkpoint(trained_run / "checkpoint-15", run / "checkpoint-15")
    half = run / ".staging" / "checkpoint-30"  # a save in progress: metadata written, weights not yet
    half.mkdir(parents=True)
    shutil.copy(trained_run / "checkpoint-30" / META_FILE, half / META_FILE)
    (run / ".staging" / "checkpoint-45").mkdir()  # an empty one
    (run / "trainer_state.json").write_text((trained_run / "trainer_state.json").read_text())
    rows = evaluate_target(evaluate_cfg(f"checkpoint={run}", "max_samples=2"))
    assert [r["step"] for r in rows] == [15]
    assert sorted(p.name for p in (run / ".staging").iterdir()) == ["checkpoint-30", "checkpoint-45"]  # untouched
    only_staged = tmp_path / "fresh"
    shutil.copytree(run / ".staging", only_staged / ".staging")
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folders"):
        evaluate_target(evaluate_cfg(f"checkpoint={only_staged}"))
    with pytest.raises(FileNotFoundError, match=r"inside \.staging/, where checkpoints are written"):
        evaluate_target(evaluate_cfg(f"checkpoint={half}"))


def _decimals(value: float) -> int:
    text = repr(value)
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def test_progress_bar_and_metrics_rounded_to_four_places(trained_run, tmp_path, capfd, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="ptune.evaluation.scoring"):
        rows = evaluate_target(evaluate_cfg(f"checkpoint={trained_run}", f"output_dir={out}", "max_samples=7"))
    bar = capfd.readouterr().err
    assert re.search(r"checkpoint-30: generating: 100%\|.*\| 7/7 .*tokens/s", bar), bar[-500:]
    assert re.search(r"checkpoint-15: 7 / 7 rows generated \(\d+ tokens/s\)", caplog.text)
    metrics = json.loads((out / "checkpoint-30" / METRICS_FILE).read_text())
    floats = [metrics[k] for k in (*METRIC_NAMES, "empty_prediction_share", "mean_prediction_length")]
    assert all(_decimals(v) <= 4 for v in floats) and any(_decimals(v) > 0 for v in floats), floats
    for line in (out / "eval_results.csv").read_text().splitlines()[1:]:
        numbers = [float(x) for x in re.findall(r"\b\d+\.\d+\b", line.rsplit(",", 1)[0])]
        assert all(_decimals(v) <= 4 for v in numbers), line
    logged = re.findall(r"'rouge-1': ([\d.]+)", caplog.text)
    assert logged and all(_decimals(float(v)) <= 4 for v in logged)
    assert [r["rouge-l"] for r in rows] == [round(r["rouge-l"], 4) for r in rows]


def results_in(folder):
    """The one ``eval-ID`` results folder the evaluator made in ``folder`` for non-default options."""
    (found,) = folder.glob("eval-*")
    return found


def tensorboard_steps(run, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    logs = EventMultiplexer().AddRunsFromDirectory(str(run / "runs" / "evaluate")).Reload()
    return [event.step for name in logs.Runs() if tag in logs.GetAccumulator(name).Tags()["scalars"]
            for event in logs.Scalars(name, tag)]  # fmt: skip


def test_already_scored_covers_the_base_settings(trained_run, tmp_path, monkeypatch):
    """Issue 19.14: the same folder scored again with another dtype or quantization is regenerated, not answered
    from the earlier settings; metrics.json's settings show base, config hash, dtype, quantization, generation."""
    out, checkpoint = tmp_path / "out", f"checkpoint={trained_run / 'checkpoint-30'}"
    plain = evaluate_target(evaluate_cfg(checkpoint, f"output_dir={out}", "max_samples=4"))[0]
    settings = json.loads((out / METRICS_FILE).read_text())["settings"]
    assert (settings["base"], settings["dtype"], settings["quantization"]) == (
        str(REPO / "models/tiny-glm"),
        "float32",
        None,
    )
    assert len(settings["base_config_sha256"]) == 64 and settings["generation"]["do_sample"] is False
    generated = []
    real = evaluation.generate_ids
    monkeypatch.setattr(evaluation, "generate_ids", lambda *a, **k: generated.append(1) or real(*a, **k))
    for override, key, value in (
        ("model.quantization=int8", "quantization", "int8"),
        ("model.dtype=bfloat16", "dtype", "bfloat16"),
    ):
        evaluate_target(evaluate_cfg(checkpoint, f"output_dir={out}", "max_samples=4", override))
        assert json.loads((out / METRICS_FILE).read_text())["settings"][key] == value
    assert len(generated) == 2  # neither was "already scored"
    again = evaluate_target(evaluate_cfg(checkpoint, f"output_dir={out}", "max_samples=4"))[0]
    assert len(generated) == 3 and again["rouge-l"] == plain["rouge-l"]  # back to fp32: regenerated, same numbers


def test_results_on_other_data_or_settings_never_replace_others(trained_run, tmp_path):
    """Issue 19.15: the checkpoint's own dev set and other data each keep their metrics and predictions."""
    run = tmp_path / "run"
    _copy_checkpoint(trained_run / "checkpoint-15", run / "checkpoint-15")
    _copy_checkpoint(trained_run / "checkpoint-30", run / "checkpoint-30")
    own = evaluate_target(evaluate_cfg(f"checkpoint={run}", "max_samples=null", "batch_size=32"))
    own_metrics = (run / "checkpoint-30" / METRICS_FILE).read_text()
    own_table = (run / "eval_results.md").read_text()
    other = tmp_path / "other"
    other.mkdir()
    rows = [json.loads(x) for x in (REPO / "data/synthetic_adgen/dev.json").read_text("utf-8").splitlines()[-5:]]
    (other / "dev.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    evaluate_target(
        evaluate_cfg(f"checkpoint={run}", "dataset=advertisegen", f"dataset.dir={other}", "max_samples=null")
    )
    assert (run / "checkpoint-30" / METRICS_FILE).read_text() == own_metrics  # untouched
    assert (run / "eval_results.md").read_text() == own_table
    elsewhere = results_in(run / "checkpoint-30")
    assert json.loads((elsewhere / METRICS_FILE).read_text())["settings"]["data"] == str(other / "dev.json")
    assert len((elsewhere / PREDICTIONS_FILE).read_text().splitlines()) == 5
    assert (
        results_in(run).name == elsewhere.name
        and (elsewhere.parent.parent / elsewhere.name / "eval_results.md").exists()
    )
    assert [r["rows"] for r in own] == [200, 200]


def test_tensorboard_gets_each_scored_step_once(trained_run, tmp_path):
    """Issue 19.16: evaluating a run again (already scored) logs nothing more."""
    run = tmp_path / "run"
    for step in (15, 30):
        _copy_checkpoint(trained_run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    shutil.copy(trained_run / "trainer_state.json", run / "trainer_state.json")
    for _ in range(2):
        evaluate_target(evaluate_cfg(f"checkpoint={run}", "max_samples=null", "batch_size=32"))
    assert sorted(tensorboard_steps(run, "eval/rouge-1")) == [15, 30]


def test_default_budget_is_the_references_and_the_reference_preset_samples(trained_run, tmp_path):
    """Issue 19.12: by default prompt + answer get max_source_length + max_target_length + 1 tokens, as the
    reference main.py's max_length (greedy); generation=reference samples within it with the reference's values."""
    loaded = load_checkpoint(trained_run / "checkpoint-30")
    settings = evaluation.generation_settings(loaded, {})
    assert settings.max_length == loaded.max_source_length + loaded.max_target_length + 1 and not settings.do_sample
    assert evaluation.generation_settings(loaded, {"max_new_tokens": 5}).max_length is None  # a fixed cap if asked
    examples = load_eval_set(loaded.metadata["config"]["dataset"], 6).examples
    prompts = [encode_prompt(loaded, ex.prompt, ex.history) for ex in examples]
    budget = GenerationSettings(max_length=max(len(p) for p in prompts) + 3)
    batched = dict(generate_ids(loaded, prompts, budget, batch_size=6))
    for i, prompt in enumerate(prompts):  # each row gets what its own prompt leaves, batched or alone
        alone = GenerationSettings(max_new_tokens=budget.max_length - len(prompt))
        assert batched[i] == next(generate_ids(loaded, [prompt], alone, batch_size=1))[1]
    assert len({len(ids) for ids in batched.values()}) > 1

    reference = [f"checkpoint={trained_run / 'checkpoint-30'}", f"output_dir={tmp_path}", "generation=reference"]
    cfg = evaluate_cfg(*reference)
    assert (cfg.generation.do_sample, cfg.generation.top_p, cfg.generation.temperature) == (True, 0.7, 0.95)
    first = evaluate_target(cfg)[0]
    assert first["generation"] == "sampled (top_p 0.7, temperature 0.95, seed 42), prompt + answer <= 193 tokens"
    assert evaluate_target(evaluate_cfg(*reference, "force=true"))[0]["rouge-l"] == first["rouge-l"]  # seeded
