"""Tests for ptune.evaluation.metrics: the same numbers as the reference ChatGLM2 P-tuning loop, in order, in
parallel."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from ptune.evaluation import metrics
from ptune.evaluation.metrics import METRIC_NAMES, SERIAL_BELOW, compute_metrics, score_pair, score_pairs, summarize

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
ADGEN_DEV = SHARED / "data" / "advertisegen" / "dev.json"


def reference_scores(preds: list[str], labels: list[str]) -> list[dict[str, float]]:
    """Each row scored the way ChatGLM2-6B's ptuning/main.py ``compute_metrics`` scores it, one row at a time: ROUGE
    F-scores of jieba's words joined by spaces from a fresh ``Rouge()``, BLEU-4 of the characters with smoothing
    method 3, both x100 and rounded to 4 places. Like the original it crashes on an empty text (tested below)."""
    rows = []
    for pred, label in zip(preds, labels, strict=True):
        rouge = Rouge().get_scores(" ".join(jieba.cut(pred)), " ".join(jieba.cut(label)))[0]
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        rows.append(
            {name: round(score["f"] * 100, 4) for name, score in rouge.items()} | {"bleu-4": round(bleu * 100, 4)}
        )
    return rows


def reference_or_zero(preds, labels):
    """The reference per row, with our one deviation: a row it crashes on scores 0 on all four."""
    out = []
    for pred, label in zip(preds, labels, strict=True):
        try:
            out += reference_scores([pred], [label])
        except ValueError:
            out.append(dict.fromkeys(METRIC_NAMES, 0.0))
    return out


LABEL = "这款连衣裙采用柔软的棉质面料，穿着舒适透气。简约的圆领设计，修饰脸型！搭配小白鞋，清新又减龄？"
HAND_MADE = [
    (LABEL, LABEL),  # identical
    ("这款裙子采用棉质面料，舒适透气，圆领设计很简约。", LABEL),
    ("。！？，", LABEL),  # punctuation only
    ("……", LABEL),
    ("......", "这款上衣......很好看"),
    ("This dress is made of soft cotton. It is comfortable!", "This soft cotton dress is very comfortable."),
    ("hello", "hello world"),
    ("宽松的版型", "宽松的版型。不挑身材，遮肉显瘦。腰部的抽绳设计，可以随意调节松紧！袖口的罗纹收口，保暖又时尚？"),
    ("好", LABEL),  # one character, fewer than 4 for BLEU
    ("显瘦显瘦显瘦显瘦显瘦", "显瘦"),  # repetition
    ("\u200b", LABEL),  # zero-width space: not whitespace to Python, scored normally
    ("\ufeff牛仔裤", "牛仔裤"),
    (" 开头和结尾的空格 ", "开头和结尾的空格"),
    ("第一句\n第二句", "第一句。第二句"),
]
WHITESPACE = ["", " ", "\n", "\t \r\n", "\u3000", "\xa0", "\x1c", "\u2028", "\x85"]


def test_identical_pair_scores_100():
    assert score_pair(LABEL, LABEL) == dict.fromkeys(METRIC_NAMES, 100.0)
    assert reference_scores([LABEL], [LABEL]) == [score_pair(LABEL, LABEL)]


@pytest.mark.parametrize(("prediction", "label"), HAND_MADE)
def test_hand_made_pairs_match_reference(prediction, label):
    got = score_pair(prediction, label)
    assert got == reference_scores([prediction], [label])[0]
    assert list(got) == list(METRIC_NAMES)
    assert all(type(v) is float for v in got.values())


def test_non_trivial_hand_made_values():
    """Guard against a vacuous comparison: these pairs really score strictly between 0 and 100."""
    partial = score_pair(*HAND_MADE[1])
    assert all(0 < partial[name] < 100 for name in METRIC_NAMES)
    punctuation = score_pair(*HAND_MADE[2])
    assert punctuation["rouge-1"] > 0  # jieba keeps punctuation as words, and the label has "，", "。", ...


def test_empty_prediction_scores_zero_where_reference_crashes():
    with pytest.raises(ValueError, match="Hypothesis is empty"):
        reference_scores([""], [LABEL])
    assert score_pair("", LABEL) == dict.fromkeys(METRIC_NAMES, 0.0)


@pytest.mark.parametrize("blank", WHITESPACE)
def test_blank_prediction_or_label_scores_zero_where_reference_crashes(blank):
    """Exactly the texts with ``not text.strip()`` make rouge_chinese raise (documented in ptune.evaluation.metrics)."""
    with pytest.raises(ValueError, match="Hypothesis is empty"):
        reference_scores([blank], [LABEL])
    with pytest.raises(ValueError, match="Reference is empty"):
        reference_scores([LABEL], [blank])
    assert score_pair(blank, LABEL) == dict.fromkeys(METRIC_NAMES, 0.0)
    assert score_pair(LABEL, blank) == dict.fromkeys(METRIC_NAMES, 0.0)
    assert score_pair(blank, blank) == dict.fromkeys(METRIC_NAMES, 0.0)


def generated_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Ad-copy-like pairs from a fixed vocabulary: related, unrelated, truncated, identical and blank predictions."""
    words = "这款 连衣裙 上衣 面料 柔软 舒适 透气 简约 时尚 宽松 显瘦 设计 圆领 袖口 搭配 气质 优雅 休闲 百搭 牛仔"
    words = words.split() + ["，", "。", "！", "？", "、", "cotton", "A字", "V领", " ", "……"]
    rng = random.Random(seed)

    def text() -> str:
        return "".join(rng.choice(words) for _ in range(rng.randint(3, 40)))

    labels = [text() for _ in range(n)]
    predictions = []
    for i, label in enumerate(labels):
        kind = i % 6
        if kind == 0:
            chars = [c if rng.random() > 0.2 else rng.choice(words) for c in label]
            predictions.append("".join(chars))
        elif kind == 1:
            predictions.append(text())
        elif kind == 2:
            predictions.append(label[: rng.randint(0, len(label))])
        elif kind == 3:
            predictions.append(label)
        elif kind == 4:
            predictions.append(rng.choice(["", " ", "\n", "\u3000", "。", "?"]))
        else:
            predictions.append(labels[(i * 7 + 1) % n])
    return predictions, labels


def test_generated_pairs_parallel_equal_reference():
    predictions, labels = generated_pairs(300)
    got = score_pairs(predictions, labels, processes=2)
    assert got == reference_or_zero(predictions, labels)
    assert any(0 < row["rouge-l"] < 100 for row in got) and any(row["bleu-4"] == 0 for row in got)


def shared_pairs() -> tuple[list[str], list[str]]:
    summaries = [json.loads(line)["summary"] for line in ADGEN_DEV.read_text(encoding="utf-8").splitlines()[:100]]
    rng = random.Random(1)
    shuffled = summaries[:]
    rng.shuffle(shuffled)
    predictions, labels = [], []
    for i, label in enumerate(summaries):
        other = summaries[(i + 1) % len(summaries)]
        perturbed = "".join(c for c in other if rng.random() > 0.15)  # another row's summary, some chars dropped
        truncated = label[: len(label) // 3]
        mixed = label[: len(label) // 2] + other[len(other) // 2 :]
        for prediction in (perturbed, shuffled[i], truncated, mixed):
            predictions.append(prediction)
            labels.append(label)
    return predictions, labels


@pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} is absent (real AdvertiseGen data)")
def test_real_summaries_parallel_equal_reference():
    if not ADGEN_DEV.exists():
        pytest.skip(f"{ADGEN_DEV} is absent")
    predictions, labels = shared_pairs()
    assert len(predictions) == 400
    got = score_pairs(predictions, labels, processes=2)
    assert got == reference_scores(predictions, labels)  # no blank rows here: the literal reference must not crash


def test_order_preserved_and_paths_agree(monkeypatch):
    pools = []
    real_context = metrics._pool_context
    monkeypatch.setattr(metrics, "_pool_context", lambda: pools.append(1) or real_context())
    predictions, labels = generated_pairs(2 * SERIAL_BELOW, seed=3)
    serial = [score_pair(pred, label) for pred, label in zip(predictions, labels, strict=True)]
    assert score_pairs(predictions, labels, processes=1) == serial
    assert not pools
    assert score_pairs(predictions, labels, processes=2) == serial
    assert pools  # really went through worker processes
    assert score_pairs(predictions, labels, processes=500) == serial  # more workers than chunks
    reversed_rows = score_pairs(predictions[::-1], labels[::-1], processes=2)
    assert reversed_rows == serial[::-1]
    assert score_pairs(predictions[:5], labels[:5], processes=2) == serial[:5]  # small input: serial path
    assert score_pairs([], []) == []


def test_summarize_and_compute_metrics():
    predictions = ["", "  ", LABEL, "这款裙子很好看。"]
    labels = [LABEL, LABEL, LABEL, LABEL]
    per_row = score_pairs(predictions, labels)
    summary = summarize(predictions, per_row)
    assert summary["rows"] == 4
    assert summary["empty_prediction_share"] == 0.5
    assert summary["mean_prediction_length"] == (0 + 2 + len(LABEL) + 8) / 4
    for name in METRIC_NAMES:
        assert summary[name] == float(np.mean([row[name] for row in per_row]))
    assert summary["rouge-1"] == (0 + 0 + 100.0 + per_row[3]["rouge-1"]) / 4
    assert compute_metrics(predictions, labels, processes=1) == summary
    assert set(summary) == {*METRIC_NAMES, "rows", "empty_prediction_share", "mean_prediction_length"}


def test_compute_metrics_means_equal_reference_means():
    predictions, labels = generated_pairs(120, seed=5)
    rows = reference_or_zero(predictions, labels)
    got = compute_metrics(predictions, labels, processes=2)
    for name in METRIC_NAMES:
        assert got[name] == float(np.mean([row[name] for row in rows]))


def test_summarize_no_rows_is_nan():
    summary = summarize([], [])
    assert summary["rows"] == 0
    assert all(math.isnan(summary[name]) for name in (*METRIC_NAMES, "empty_prediction_share"))


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        score_pairs(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="pair up"):
        compute_metrics(["a"], [])
    with pytest.raises(ValueError, match="pair up"):
        summarize(["a", "b"], [score_pair("a", "a")])
    with pytest.raises(ValueError, match="processes"):
        score_pairs(["a"], ["a"], processes=0)


def test_jieba_startup_log_suppressed():
    assert logging.getLogger("jieba").level >= logging.WARNING
