"""Tokenised layouts on hand-checked examples (the shipped character tokenizer: one id per character)."""

from __future__ import annotations

import logging
import os

import pytest
from transformers import AutoTokenizer

import ptune.data.features as features
from ptune.data.features import IGNORE_INDEX, encode_examples, make_collator, tokenize_file
from ptune.data.prompts import PromptFormat
from ptune.data.reading import Example, read_examples
from tests.conftest import TINY_GLM


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_GLM)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chatglm2_prompt_format_single_and_multi_turn():
    fmt = PromptFormat()
    assert fmt.build("类型#裙") == "[Round 1]\n\n问：类型#裙\n\n答："
    assert fmt.build("再短一点", [("写文案", "好的"), ("换个颜色", "红色")]) == (
        "[Round 1]\n\n问：写文案\n\n答：好的\n\n"
        "[Round 2]\n\n问：换个颜色\n\n答：红色\n\n"
        "[Round 3]\n\n问：再短一点\n\n答："
    )


def test_configured_template_and_bad_kind():
    fmt = PromptFormat.from_config(
        {"kind": "template", "turn": "Q{index}:{query}\nA:{response}\n", "query": "Q{index}:{query}\nA:"}
    )
    assert fmt.build("c", [("a", "b")]) == "Q1:a\nA:b\nQ2:c\nA:"
    with pytest.raises(ValueError, match="chatglm2, chat_template or template"):
        PromptFormat.from_config({"kind": "alpaca"})


def test_chat_template_needs_one(tokenizer):
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        PromptFormat.from_config({"kind": "chat_template"}).build("q", (), tokenizer)


def test_layout_prompt_answer_eos_and_labels(tokenizer):
    gmask, sop = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])
    out = encode_examples([Example("类型#裙", "红色长裙")], tokenizer, PromptFormat(), 64, 128)
    prompt = [gmask, sop, *ids(tokenizer, "[Round 1]\n\n问：类型#裙\n\n答：")]
    answer = ids(tokenizer, "红色长裙")
    assert out["input_ids"] == [prompt + answer + [tokenizer.eos_token_id]]
    assert out["labels"] == [[IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]]
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


def test_truncation_of_prompt_and_answer(tokenizer):
    out = encode_examples([Example("类型#裙*颜色#红色", "一二三四五六七八")], tokenizer, PromptFormat(), 10, 5)
    row = out["input_ids"][0]
    # prompt cut to 10 ids including [gMASK] sop (the end, "答：", is lost as in the reference), answer to 5, then eos
    assert len(row) == 10 + 5 + 1
    assert row[2:10] == ids(tokenizer, "[Round 1]\n\n问：类型#裙*颜色#红色")[:8]
    assert row[10:15] == ids(tokenizer, "一二三四五")
    assert out["labels"][0] == [IGNORE_INDEX] * 10 + ids(tokenizer, "一二三四五") + [2]


def test_multi_turn_history_is_in_the_prompt_not_the_labels(tokenizer):
    out = encode_examples([Example("短一点", "好", (("写文案", "很长的文案"),))], tokenizer, PromptFormat(), 256, 16)
    text = tokenizer.decode(out["input_ids"][0], skip_special_tokens=True)
    assert text == "[Round 1]\n\n问：写文案\n\n答：很长的文案\n\n[Round 2]\n\n问：短一点\n\n答：好"
    assert [t for t in out["labels"][0] if t != IGNORE_INDEX] == ids(tokenizer, "好") + [2]


def test_a_long_history_loses_its_oldest_turns_not_the_question(tokenizer, tmp_path, caplog):
    history = tuple((f"问题{k}", "好" * 8) for k in range(6))
    rows = [Example("新的问题", "答", history), Example("单独", "答")]
    out, stats = features._encode(rows, tokenizer, PromptFormat(), 100, 16)
    text = tokenizer.decode(out["input_ids"][0], skip_special_tokens=True)
    assert "问：新的问题\n\n答：答" in text  # the question and its answer are there (a cut at the end lost them)
    assert "问题5" in text and "问题0" not in text  # newest turns kept, oldest left out
    prompt_length = out["labels"][0].count(IGNORE_INDEX)
    assert prompt_length <= 100
    assert stats.history_rows_shortened == 1 and 0 < stats.history_turns_dropped < 6 and stats.prompts_truncated == 0
    one_more = PromptFormat().build("新的问题", history[stats.history_turns_dropped - 1 :], tokenizer)
    assert len(tokenizer(one_more)["input_ids"]) > 100  # it kept as many turns as fit
    with caplog.at_level(logging.INFO, logger="ptune"):
        features.check_split("train.json", stats, (100, 16))
    assert "1 of 2 rows left out their oldest turns" in caplog.text


def test_collator_pads_dynamically_on_the_right(tokenizer):
    rows = encode_examples([Example("a", "bc"), Example("abcd", "efghij")], tokenizer, PromptFormat(), 64, 128)
    batch = make_collator(tokenizer, None)([{k: v[i] for k, v in rows.items()} for i in range(2)])
    longest = max(len(r) for r in rows["input_ids"])
    assert batch["input_ids"].shape == (2, longest)  # to the longest row, not a fixed 193
    short = len(rows["input_ids"][0])
    assert batch["input_ids"][0, short:].eq(0).all() and batch["attention_mask"][0, short:].eq(0).all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, :short].tolist() == rows["input_ids"][0]
    padded8 = make_collator(tokenizer, 8)([{k: v[i] for k, v in rows.items()} for i in range(2)])
    assert padded8["input_ids"].shape[1] % 8 == 0


def test_tokenised_data_is_cached(tokenizer, tmp_path, monkeypatch):
    data = tmp_path / "train.json"
    data.write_text('{"q": "a", "r": "b"}\n', encoding="utf-8")
    examples = [Example("a", "b")]
    first = tokenize_file(data, examples, tokenizer, PromptFormat(), 64, 128, tmp_path / "cache")
    monkeypatch.setattr(features, "_encode", lambda *a, **k: pytest.fail("re-tokenised despite the cache"))
    again = tokenize_file(data, examples, tokenizer, PromptFormat(), 64, 128, tmp_path / "cache")
    assert again["input_ids"] == first["input_ids"]
    data.write_text('{"q": "a", "r": "c"}\n', encoding="utf-8")  # changed file: a new cache entry
    with pytest.raises(pytest.fail.Exception):
        tokenize_file(data, [Example("a", "c")], tokenizer, PromptFormat(), 64, 128, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_cache_key_covers_columns_history_and_encoding(tokenizer, tmp_path, caplog):
    """The same file read with other columns (or without its history) is tokenised anew, never the old mapping."""
    data = tmp_path / "train.json"
    data.write_text('{"q": "问题", "a": "答案", "h": [["早", "好"]]}\n', encoding="utf-8")
    cache = tmp_path / "cache"

    def tokenised(**columns):
        examples = read_examples(data, **columns).examples
        return tokenize_file(data, examples, tokenizer, PromptFormat(), 64, 128, cache)["input_ids"][0]

    plain = tokenised(prompt_column="q", response_column="a", history_column=None)
    swapped = tokenised(prompt_column="a", response_column="q", history_column=None)
    with_history = tokenised(prompt_column="q", response_column="a", history_column="h")
    latin = tokenised(prompt_column="q", response_column="a", history_column=None, encoding="latin-1")
    assert len({str(plain), str(swapped), str(with_history), str(latin)}) == 4
    assert plain == encode_examples([Example("问题", "答案")], tokenizer, PromptFormat(), 64, 128)["input_ids"][0]
    assert len(list(cache.iterdir())) == 4


def test_tokenizer_fingerprint_is_stable_once_the_tokenizer_was_used(tmp_path, monkeypatch):
    """Tokenising sets the backend's truncation state and padding_side its padding: the same tokenizer, the same key,
    so a split tokenised with a used tokenizer is read from the cache."""
    fresh = AutoTokenizer.from_pretrained(TINY_GLM)
    before = features.tokenizer_fingerprint(fresh)
    data = tmp_path / "train.json"
    data.write_text('{"q": "a", "r": "b"}\n', encoding="utf-8")
    tokenize_file(data, [Example("a", "b")], fresh, PromptFormat(), 5, 7, tmp_path / "cache")
    fresh.padding_side = "left"
    fresh(["a", "abc"], padding=True, truncation=True, max_length=2)
    assert features.tokenizer_fingerprint(fresh) == before
    monkeypatch.setattr(features, "_encode", lambda *a, **k: pytest.fail("re-tokenised with a used tokenizer"))
    tokenize_file(data, [Example("a", "b")], fresh, PromptFormat(), 5, 7, tmp_path / "cache")
    other = AutoTokenizer.from_pretrained(TINY_GLM)
    other.add_tokens(["新词"])  # a real change of the vocabulary still changes the key
    assert features.tokenizer_fingerprint(other) != before


def test_stale_cache_staging_folders_are_removed(tokenizer, tmp_path):
    """A killed cache write leaves ``.KEY.PID.tmp``: removed on the next use of the cache, unless its writer lives."""
    cache = tmp_path / "cache"
    dead_pid = max(2, os.getpid() + 10_000_000)  # above any pid Linux hands out (pid_max <= 4,194,304)
    stale = cache / f".0123456789abcdef01234567.{dead_pid}.tmp"
    live = cache / f".fedcba9876543210fedcba98.{os.getpid()}.tmp"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "data-00000-of-00001.arrow").write_bytes(b"partial")
    data = tmp_path / "train.json"
    data.write_text('{"q": "a", "r": "b"}\n', encoding="utf-8")
    tokenize_file(data, [Example("a", "b")], tokenizer, PromptFormat(), 64, 128, cache)
    assert not stale.exists()
    assert live.exists()  # a write in progress (here: this process) is left alone


def test_unknown_characters_and_truncation_are_counted_and_warned(tokenizer, tmp_path, caplog):
    data = tmp_path / "train.json"
    data.write_text('{"q": "a", "r": "b"}\n', encoding="utf-8")
    rare = "\U0001f600\U0001f601"  # not in the character vocabulary: <unk>
    examples = [Example("类型#裙" + rare, "红色" + rare), Example("类型", "红色红色红色红色")]
    with caplog.at_level("INFO", logger="ptune.data.features"):
        tokenize_file(data, examples, tokenizer, PromptFormat(), 64, 5, None)
    text = caplog.text
    assert "answer <unk>: 2 of 9 tokens (22.2%)" in text  # 红色 + 2 unknown, and 5 of the 8 other characters
    assert "answers cut: 1 of 2 rows (50.0%), at dataset.max_target_length=5" in text
    assert "prompts cut 0 of 2 rows" in text
    stats = features._encode(examples, tokenizer, PromptFormat(), 64, 5)[1]
    assert (stats.prompt_unk, stats.answer_unk, stats.answers_truncated) == (2, 2, 1)


def test_no_answer_tokens_or_no_labels_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_target_length=0"):
        encode_examples([Example("a", "b")], tokenizer, PromptFormat(), 64, 0)
    stats = features.TokenStats(3, 9, 0, 0, 0, 0, 0, labelled_tokens=0)  # 3 rows, 9 prompt tokens
    with pytest.raises(ValueError, match=r"train\.json: every label of the split is masked"):
        features.check_split("train.json", stats, (64, 128))
