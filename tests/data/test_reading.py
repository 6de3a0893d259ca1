"""Tests for ptune.data.reading (reading examples) and the shipped synthetic data sets."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from ptune.data.reading import DataError, Example, ReadResult, read_examples

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def jsonl(*rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read(path, **kw) -> ReadResult:
    kw.setdefault("prompt_column", "prompt")
    kw.setdefault("response_column", "response")
    return read_examples(path, **kw)


# ---------------------------------------------------------------------------------------------------------
# Good input.
# ---------------------------------------------------------------------------------------------------------


def test_reads_jsonl_with_blank_lines(tmp_path):
    f = write(
        tmp_path / "train.json",
        '{"content": "类型#裙", "summary": "好看的裙子"}\n\n   \n{"content": "类型#裤", "summary": "裤子"}\n',
    )
    result = read_examples(f, prompt_column="content", response_column="summary")
    assert result.examples == [Example("类型#裙", "好看的裙子"), Example("类型#裤", "裤子")]
    assert result.skipped_empty == 0
    assert result.examples[0].history == ()


def test_reads_crlf_bom_and_no_trailing_newline(tmp_path):
    f = write(tmp_path / "a.json", '\ufeff{"prompt": "p1", "response": "r1"}\r\n{"prompt": "p2", "response": "r2"}')
    assert [e.prompt for e in read(f).examples] == ["p1", "p2"]


def test_accepts_str_path(tmp_path):
    f = write(tmp_path / "a.json", jsonl({"prompt": "p", "response": "r"}))
    assert read(str(f)).examples == [Example("p", "r")]


def test_reads_json_list(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    f = write(tmp_path / "list.json", json.dumps(rows, indent=2))
    result = read(f)
    assert [e.prompt for e in result.examples] == ["p0", "p1", "p2"]
    assert write(tmp_path / "one_line.json", json.dumps(rows)) and len(read(tmp_path / "one_line.json").examples) == 3


def test_history_parsing(tmp_path):
    f = write(
        tmp_path / "chat.json",
        jsonl(
            {"q": "q3", "a": "a3", "h": [["q1", "a1"], ["q2", "a2"]]},
            {"q": "q", "a": "a", "h": []},
            {"q": "q", "a": "a", "h": None},
        ),
    )
    result = read_examples(f, prompt_column="q", response_column="a", history_column="h")
    assert result.examples[0] == Example("q3", "a3", (("q1", "a1"), ("q2", "a2")))
    assert result.examples[1].history == ()
    assert result.examples[2].history == ()
    # Without history_column the history is ignored.
    assert read_examples(f, prompt_column="q", response_column="a").examples[0].history == ()


def test_other_encoding(tmp_path):
    f = write(tmp_path / "gbk.json", jsonl({"prompt": "类型#裙", "response": "红色裙子"}), encoding="gbk")
    assert read(f, encoding="gbk").examples == [Example("类型#裙", "红色裙子")]


def test_skips_and_logs_empty_rows(tmp_path, caplog):
    f = write(
        tmp_path / "train.json",
        jsonl(
            {"prompt": "p", "response": "r"},
            {"prompt": "", "response": "r"},
            {"prompt": "p", "response": "  \n\t"},
            {"prompt": "p2", "response": "r2"},
        ),
    )
    with caplog.at_level(logging.WARNING, logger="ptune.data.reading"):
        result = read(f)
    assert result.skipped_empty == 2
    assert [e.prompt for e in result.examples] == ["p", "p2"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "ptune.data.reading"]
    assert len(warnings) == 1
    assert "train.json" in warnings[0].getMessage() and "2" in warnings[0].getMessage()


def test_no_warning_when_nothing_skipped(tmp_path, caplog):
    f = write(tmp_path / "train.json", jsonl({"prompt": "p", "response": "r"}))
    with caplog.at_level(logging.WARNING, logger="ptune.data.reading"):
        read(f)
    assert not [r for r in caplog.records if r.name == "ptune.data.reading"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: every message names the file and line and says how to fix it.
# ---------------------------------------------------------------------------------------------------------


def error(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        read(path, **kw)
    return str(info.value)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_invalid_json_line(tmp_path):
    f = write(tmp_path / "bad.json", jsonl({"prompt": "p", "response": "r"}) + "\n" + '{"prompt": "p", "resp\n')
    msg = error(f)
    assert f"{f}:3:" in msg
    assert "not valid JSON" in msg
    assert "Unterminated string" in msg  # the json module's own message
    assert "one JSON object" in msg


def test_not_an_object(tmp_path):
    f = write(tmp_path / "bad.json", jsonl({"prompt": "p", "response": "r"}, ["p", "r"]))
    msg = error(f)
    assert f"{f}:2:" in msg
    assert "JSON object" in msg and "list" in msg


@pytest.mark.parametrize(
    ("row", "key", "config_key"),
    [
        ({"content": "c", "response": "r"}, "prompt", "dataset.prompt_column"),
        ({"prompt": "p", "summary": "s"}, "response", "dataset.response_column"),
        ({"prompt": "p", "response": "r"}, "history", "dataset.history_column"),
    ],
)
def test_missing_column(tmp_path, row, key, config_key):
    f = write(tmp_path / "train.json", jsonl({"prompt": "p", "response": "r", "history": []}, row))
    msg = error(f, history_column="history")
    assert f"{f}:2:" in msg
    assert f"'{key}'" in msg
    for present in row:
        assert repr(present) in msg  # lists the keys the row does have
    assert f"{config_key}=" in msg


@pytest.mark.parametrize(
    ("row", "key"),
    [
        ({"prompt": 3, "response": "r"}, "prompt"),
        ({"prompt": "p", "response": None}, "response"),
        ({"prompt": "p", "response": ["r"]}, "response"),
    ],
)
def test_prompt_response_wrong_type(tmp_path, row, key):
    f = write(
        tmp_path / "train.json",
        jsonl({"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r"}, row),
    )
    msg = error(f)
    assert f"{f}:3:" in msg
    assert f"'{key}'" in msg and "must be a string" in msg


@pytest.mark.parametrize(
    "history",
    ["q1 a1", [["q1"]], [["q1", "a1", "x"]], [["q1", 2]], [None], {"q1": "a1"}, [["q1", "a1"], "q2"]],
)
def test_history_wrong_type(tmp_path, history):
    f = write(tmp_path / "chat.json", jsonl({"prompt": "p", "response": "r", "history": history}))
    msg = error(f, history_column="history")
    assert f"{f}:1:" in msg
    assert "'history'" in msg
    assert "[query, answer]" in msg


def test_not_utf8(tmp_path):
    good = jsonl({"prompt": "p", "response": "r"}).encode()
    f = tmp_path / "gbk.json"
    f.write_bytes(good + good + jsonl({"prompt": "类型#裙", "response": "红色"}).encode("gbk"))
    msg = error(f)
    assert f"{f}:3:" in msg
    assert "not valid utf-8" in msg
    offset = len(good) * 2 + len(b'{"prompt": "')
    assert f"byte offset {offset}" in msg
    assert "iconv -f gbk -t utf-8" in msg
    assert "dataset.encoding=gbk" in msg


def test_the_encoding_hint_names_the_encoding_used_and_one_that_decodes_the_file(tmp_path):
    f = write(tmp_path / "utf8.json", jsonl({"prompt": "类型#裙*颜色#红色", "response": "这条红色裙子很好看"}))
    msg = error(f, encoding="gbk")
    assert "not valid gbk (dataset.encoding=gbk;" in msg
    assert "It decodes as utf-8: set dataset.encoding=utf-8" in msg
    assert "set dataset.encoding=gbk" not in msg  # the setting already in force is no advice
    assert "train and the validation file alike" in msg


def test_the_encoding_hint_when_no_likely_encoding_decodes_the_file(tmp_path):
    f = tmp_path / "binary.json"
    f.write_bytes(b'{"prompt": "\x80\x80", "response": "r"}\n')
    msg = error(f)
    assert "It is not gbk or gb18030 either" in msg and "set dataset.encoding to it" in msg


def test_unknown_encoding(tmp_path):
    f = write(tmp_path / "a.json", jsonl({"prompt": "p", "response": "r"}))
    assert "dataset.encoding" in error(f, encoding="no-such-codec")


def test_missing_file(tmp_path):
    f = tmp_path / "nope" / "train.json"
    msg = error(f)
    assert str(f) in msg
    assert "not found" in msg
    assert "dataset.dir" in msg and "dataset.train_file" in msg


def test_directory_instead_of_file(tmp_path):
    msg = error(tmp_path)
    assert str(tmp_path) in msg and "dataset.dir" in msg


@pytest.mark.parametrize("text", ["", "\n\n  \n", "\ufeff"])
def test_empty_file(tmp_path, text):
    f = write(tmp_path / "empty.json", text)
    msg = error(f)
    assert str(f) in msg and "empty" in msg


def test_empty_json_list(tmp_path):
    f = write(tmp_path / "empty.json", " [ ]\n")
    assert str(f) in error(f)


def test_no_usable_rows(tmp_path, caplog):
    f = write(tmp_path / "blank.json", jsonl({"prompt": " ", "response": "r"}, {"prompt": "p", "response": ""}))
    with caplog.at_level(logging.WARNING, logger="ptune.data.reading"):
        msg = error(f)
    assert str(f) in msg and "no usable rows" in msg and "2" in msg
    assert "dataset.prompt_column" in msg


# JSON list input reports the line where the item starts and the 1-based item number.


def test_json_list_bad_item_type(tmp_path):
    f = write(
        tmp_path / "list.json",
        '[\n  {"prompt": "p", "response": "r"},\n  {"prompt": "p", "response": "r"},\n  7\n]',
    )
    msg = error(f)
    assert f"{f}:4 (item 3):" in msg
    assert "JSON object" in msg and "number" in msg


def test_json_list_missing_key(tmp_path):
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "answer": "r"}]
    f = write(tmp_path / "list.json", json.dumps(rows, indent=2))
    msg = error(f)
    # indent=2: "[", "  {", "prompt", "response", "  },", then item 2's "  {" on line 6.
    start_line = json.dumps(rows, indent=2).splitlines().index("  {", 2) + 1
    assert start_line == 6
    assert f"{f}:{start_line} (item 2):" in msg
    assert "'response'" in msg and "'answer'" in msg and "dataset.response_column=" in msg


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[\n{"prompt": "p", "response": "r"},\n{"prompt": "p" "response": "r"}\n]', 3),
        ('[\n{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": "r"}\n]', 3),
        ('[\n{"prompt": "p", "response": "r"},\n', 3),
        ('[{"prompt": "p", "response": "r"}]\n\n{"x": 1}', 3),
    ],
)
def test_json_list_invalid(tmp_path, text, line):
    f = write(tmp_path / "list.json", text)
    msg = error(f)
    assert f"{f}:{line}:" in msg
    assert "not valid JSON" in msg and "JSON list" in msg


# ---------------------------------------------------------------------------------------------------------
# The shipped synthetic data.
# ---------------------------------------------------------------------------------------------------------

SHIPPED = {
    "synthetic_adgen/train.json": 2000,
    "synthetic_adgen/dev.json": 200,
    "synthetic_chat/train.json": 200,
    "synthetic_chat/dev.json": 40,
}


@pytest.mark.parametrize("split", ["train", "dev"])
def test_synthetic_adgen_reads_cleanly(split):
    path = DATA / "synthetic_adgen" / f"{split}.json"
    result = read_examples(path, prompt_column="content", response_column="summary")
    assert len(result.examples) == SHIPPED[f"synthetic_adgen/{split}.json"]
    assert result.skipped_empty == 0
    for ex in result.examples:
        attrs = [kv.split("#") for kv in ex.prompt.split("*")]
        assert attrs[0][0] == "类型" and all(len(kv) == 2 and kv[1] for kv in attrs)
        assert 30 <= len(ex.response) <= 90
        assert 1 <= ex.response.count("。") <= 3 and ex.response.endswith("。")
        # The copy reuses attribute values from the content.
        assert sum(v in ex.response for _, v in attrs[1:]) >= 1
        assert ex.history == ()


def test_synthetic_adgen_train_dev_disjoint():
    read_prompts = lambda split: {  # noqa: E731
        e.prompt
        for e in read_examples(
            DATA / "synthetic_adgen" / f"{split}.json", prompt_column="content", response_column="summary"
        ).examples
    }
    train, dev = read_prompts("train"), read_prompts("dev")
    assert len(train) == 2000 and len(dev) == 200
    assert not train & dev


@pytest.mark.parametrize("split", ["train", "dev"])
def test_built_in_default_fits_its_own_lengths(split):
    """`python train.py` as shipped cuts no prompt and no answer (so warns of none): every row fits the default
    dataset.max_source_length / max_target_length in the built-in model's tokens, prompt format included."""
    from ptune.data.prompts import PromptFormat
    from ptune.model.base import load_tokenizer
    from tests.conftest import compose_config

    cfg = compose_config("train")
    tokenizer, prompt_format = load_tokenizer(cfg.model.path), PromptFormat.from_config(cfg.model.prompt)
    source, target = cfg.dataset.max_source_length, cfg.dataset.max_target_length
    rows = read_examples(Path(cfg.dataset.dir) / f"{split}.json", prompt_column="content", response_column="summary")
    for ex in rows.examples:
        prompt = tokenizer(prompt_format.build(ex.prompt))["input_ids"]
        answer = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
        assert len(prompt) <= source, (ex.prompt, len(prompt))
        assert len(answer) <= target, (ex.response, len(answer))


@pytest.mark.parametrize("split", ["train", "dev"])
def test_synthetic_chat_reads_cleanly(split):
    path = DATA / "synthetic_chat" / f"{split}.json"
    result = read_examples(path, prompt_column="prompt", response_column="response", history_column="history")
    assert len(result.examples) == SHIPPED[f"synthetic_chat/{split}.json"]
    assert result.skipped_empty == 0
    n_turns = {len(e.history) for e in result.examples}
    assert n_turns == {0, 1, 2}
    for ex in result.examples:
        assert all(q.strip() and a.strip() for q, a in ex.history)
        if not ex.history:
            assert "类型#" in ex.prompt


def test_synthetic_character_inventory_is_small():
    chars = set()
    for name in SHIPPED:
        chars |= set((DATA / name).read_text(encoding="utf-8"))
    assert 100 <= len(chars) <= 600


def test_regenerating_gives_identical_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_synthetic_data", REPO / "scripts" / "make_synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_every_bad_row_is_reported_at_once(tmp_path):
    """Up to 20 bad rows in one error, each with file:line and the key, and how many there are in all."""
    good = json.dumps({"prompt": "p", "response": "r"})
    lines = [good, '{"prompt": "p", "resp', json.dumps({"prompt": "p", "answer": "r"}), good]
    lines += [json.dumps({"prompt": 7, "response": "r"})] * 23  # lines 5..27
    f = write(tmp_path / "bad.json", "\n".join(lines) + "\n")
    msg = error(f)
    assert f"{f}: 25 bad rows, the first 20 below" in msg
    listed = msg.splitlines()[1:]
    assert len(listed) == 20
    assert f"{f}:2: not valid JSON" in listed[0]
    assert f"{f}:3: missing key 'response'" in listed[1]
    assert [line.split(": ")[0].strip() for line in listed[2:]] == [f"{f}:{n}" for n in range(5, 23)]
    assert all("'prompt' (the prompt column) must be a string" in line for line in listed[2:])


def test_json_list_reports_bad_items_before_a_syntax_error(tmp_path):
    f = write(tmp_path / "list.json", '[\n{"prompt": "p", "response": "r"},\n7,\n{"prompt": 1, "response": "r"}\n{"x"')
    msg = error(f)
    assert f"{f}: 3 bad rows;" in msg
    assert f"{f}:3 (item 2): expected a JSON object" in msg and f"{f}:4 (item 3): 'prompt'" in msg
    assert f"{f}:5: not valid JSON" in msg


def test_skipped_rows_warning_names_their_lines(tmp_path, caplog):
    rows = [{"prompt": "p", "response": "r"}] + [{"prompt": "", "response": "r"}] * 7
    f = write(tmp_path / "train.json", jsonl(*rows))
    with caplog.at_level(logging.WARNING, logger="ptune.data.reading"):
        assert read(f).skipped_empty == 7
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "ptune.data.reading"]
    assert "skipped 7 of 8 rows" in warning and "(line 2, 3, 4, 5, 6, ...)" in warning
