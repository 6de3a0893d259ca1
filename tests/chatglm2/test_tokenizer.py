"""ChatGLM2's tokenizer rebuilt without remote code must give exactly SentencePiece's ids (needs ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MODEL_DIR = SHARED / "models" / "chatglm2-6b-files"
TOKENIZER_MODEL = MODEL_DIR / "tokenizer.model"
DEV = SHARED / "data" / "advertisegen" / "dev.json"

pytestmark = pytest.mark.skipif(not TOKENIZER_MODEL.exists(), reason="../shared (ChatGLM2 tokenizer.model) is absent")

MASK, GMASK, SMASK, SOP, EOP = 64789, 64790, 64791, 64792, 64793
SPECIAL_IDS = {0, 1, 2, MASK, GMASK, SMASK, SOP, EOP}
PREFIX = [GMASK, SOP]

AWKWARD = [
    "",
    " ",
    "  ",
    "a",
    " leading",
    "trailing ",
    "  both  ",
    "multiple    inner   spaces",
    " " * 17,
    "\t",
    "tab\tseparated\t\tvalues",
    "\n",
    "line\nbreak",
    "double\n\nbreak",
    "windows\r\nline\r\n",
    "\n" * 5,
    " \n \t \r\n ",
    "0",
    "12345",
    "3.1415926535",
    "12345678901234567890123456789",
    "价格199元，折扣8.5折",
    "😀",
    "👨‍👩‍👧‍👦 family",
    "👍🏽🇨🇳",
    "ＡＢＣ１２３，。！",
    "全角：（括号）【方括号】“引号”",
    "\u3000全角空格\u3000",
    "Hello世界, mixed 中文 English text!",
    "sop",
    "eop",
    "</s>",
    "<s>",
    "<unk>",
    "[gMASK]",
    "[MASK]",
    "[sMASK]",
    "问：sop 答：eop </s><s><unk>[gMASK][MASK]sop",
    "<0x41>",
    "▁",
    "▁▁ ▁",
    "𠀀",
    "𠀀𠀁𪚥",
    "\x00\x01\x07\x1b\x1d\x1f\x7f",
    "\u200b\u200d\ufeff",
    "e\u0301 é ﬁ Ⅻ ①②",
    "......————!!!!!!=====",
    "哈哈哈哈哈哈",
]


@pytest.fixture(scope="module")
def sp():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))


@pytest.fixture(scope="module")
def tok():
    from ptune.chatglm2.tokenizer import build_chatglm2_tokenizer

    return build_chatglm2_tokenizer(TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoTokenizer

    from ptune.chatglm2.tokenizer import save_chatglm2_tokenizer

    out = tmp_path_factory.mktemp("chatglm2_tokenizer")
    save_chatglm2_tokenizer(TOKENIZER_MODEL, out)
    return out, AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def dev_texts():
    if not DEV.exists():
        pytest.skip("../shared/data/advertisegen/dev.json is absent")
    rows = [json.loads(line) for line in DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 1070
    prompts = ["[Round 1]\n\n问：" + r["content"] + "\n\n答：" for r in rows]
    return prompts, [r["summary"] for r in rows]


def non_special(ids):
    return [i for i in ids if i not in SPECIAL_IDS]


def test_vocabulary_and_special_tokens(sp, tok):
    assert sp.get_piece_size() == MASK == 64789
    assert len(tok) == 64794
    assert tok.convert_tokens_to_ids(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]) == [MASK, GMASK, SMASK, SOP, EOP]
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    for i in (3, 13, 258, 30910, 64788):  # sp pieces keep their ids
        assert tok.convert_ids_to_tokens(i) == sp.id_to_piece(i)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", 0)
    assert tok.unk_token_id == 0
    assert tok.bos_token is None and tok.bos_token_id is None  # left unset on purpose
    assert tok.padding_side == "left"
    assert set(tok.all_special_ids) >= {0, 2, MASK, GMASK, SMASK, SOP, EOP}


def test_dev_json_ids_equal_sentencepiece(sp, tok, dev_texts):
    prompts, answers = dev_texts
    assert tok(prompts)["input_ids"] == [PREFIX + ids for ids in sp.encode(prompts)]
    assert tok(prompts, add_special_tokens=False)["input_ids"] == sp.encode(prompts)
    assert tok(answers, add_special_tokens=False)["input_ids"] == sp.encode(answers)


@pytest.mark.parametrize("text", AWKWARD, ids=[ascii(t)[:40] for t in AWKWARD])
def test_awkward_strings_equal_sentencepiece(sp, tok, text):
    expected = sp.encode(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == expected
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok(text)["input_ids"] == PREFIX + expected
    assert not set(tok(text)["input_ids"][2:]) & SPECIAL_IDS  # "sop", "</s>", "[gMASK]" ... in text stay text
    assert tok.decode(PREFIX + expected, skip_special_tokens=True) == sp.decode(expected)


def test_special_words_in_text_stay_text(sp, tok):
    text = "sop eop </s> <s> <unk> [gMASK] [MASK] [sMASK]"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(text)
    assert not set(ids) & SPECIAL_IDS
    assert tok.tokenize(text) == sp.encode(text, out_type=str)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_batch_equals_single(sp, tok):
    batch = tok(AWKWARD, add_special_tokens=False)["input_ids"]
    assert batch == [sp.encode(t) for t in AWKWARD]


@pytest.mark.parametrize("max_length", [2, 3, 5, 10, 64])
def test_prefix_and_truncation(sp, tok, dev_texts, max_length):
    prompts, answers = dev_texts
    prompts, answers = prompts[:50], answers[:50]
    got = tok(prompts, truncation=True, max_length=max_length)["input_ids"]
    # the text ids are cut to max_length - 2, so the total is max_length
    assert got == [PREFIX + ids[: max_length - 2] for ids in sp.encode(prompts)]
    assert all(len(ids) == min(max_length, 2 + len(full)) for ids, full in zip(got, sp.encode(prompts), strict=True))
    got = tok(answers, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    assert got == [ids[:max_length] for ids in sp.encode(answers)]


def test_empty_string_gets_only_the_prefix(tok):
    assert tok("")["input_ids"] == PREFIX
    assert tok("", add_special_tokens=False)["input_ids"] == []


def test_decode_skips_special_ids_and_equals_sentencepiece(sp, tok, dev_texts):
    prompts, answers = dev_texts
    ids = [PREFIX + a + b + [2] for a, b in zip(sp.encode(prompts), sp.encode(answers), strict=True)]
    expected = [sp.decode(non_special(x)) for x in ids]
    assert tok.batch_decode(ids, skip_special_tokens=True) == expected
    assert [tok.decode(x, skip_special_tokens=True) for x in ids[:20]] == expected[:20]
    # special ids anywhere, including pad/bos/eos and every appended token
    mixed = [0, 0, GMASK, SOP] + sp.encode("你好 world") + [1, MASK, SMASK] + sp.encode("\n再见") + [EOP, 2]
    assert tok.decode(mixed, skip_special_tokens=True) == sp.decode(non_special(mixed))


def test_decode_of_slices_and_cut_characters(sp, tok):
    # Every slice, including ones cutting a byte-fallback character (𠀀, 👨, 🏽 are byte-encoded). Known corner not
    # covered: a slice cutting one of two *adjacent* byte-encoded characters (e.g. in 👍🏽, a ZWJ emoji or 𠀀𠀁) decodes
    # the whole byte run to U+FFFDs where SentencePiece keeps the complete character.
    texts = ["😀 ok\n👨 a 𠀀 end", "line\n𠀀\t𪚥 x\n", "👍 🏽 ＡＢＣ１２３", "  spaced   out  ", "价格199元，包邮"]
    for text in texts:
        ids = sp.encode(text)
        for start in range(len(ids)):
            for stop in range(start, len(ids) + 1):
                piece = ids[start:stop]
                assert tok.decode(piece, skip_special_tokens=True) == sp.decode(piece), (text, piece)
    # a newline (byte <0x0A>) next to a cut-off byte-encoded character, as at the end of a truncated generation:
    # SentencePiece keeps the newline and writes one U+FFFD per stray byte
    cut = sp.encode("好\n") + sp.encode("👨")[1:3]
    assert tok.decode(cut, skip_special_tokens=True) == sp.decode(cut) == "好\n\ufffd\ufffd"


def test_left_padding_and_collator(tok):
    from transformers import DataCollatorForSeq2Seq

    enc = tok(["短", "一个长得多的句子"], padding=True)
    short, long = enc["input_ids"]
    assert len(short) == len(long)
    n_pad = len(long) - len(tok("短")["input_ids"])
    assert short[:n_pad] == [0] * n_pad and short[n_pad:] == tok("短")["input_ids"]
    assert enc["attention_mask"][0] == [0] * n_pad + [1] * (len(short) - n_pad)

    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="np")
    batch = collator([{"input_ids": [5, 6, 7], "labels": [8, 9, 10]}, {"input_ids": [5], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[8, 9, 10], [-100, -100, 8]]


def test_pair_layout_matches_the_original(sp, tok):
    # build_inputs_with_special_tokens(a, b) = [gMASK, sop] + a + b + [eos]
    assert tok("问题", "回答")["input_ids"] == PREFIX + sp.encode("问题") + sp.encode("回答") + [2]


def test_save_and_plain_autotokenizer_round_trip(sp, tok, saved, dev_texts):
    out, loaded = saved
    assert (out / "tokenizer.json").exists()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in config and config["tokenizer_class"] != "ChatGLMTokenizer"
    assert loaded.padding_side == "left"
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token) == (2, 0, None)
    assert len(loaded) == len(tok)

    prompts, answers = dev_texts
    texts = AWKWARD + prompts[:100] + answers[:100]
    assert loaded(texts, add_special_tokens=False)["input_ids"] == [sp.encode(t) for t in texts]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    truncated = tok(prompts[:20], truncation=True, max_length=16)["input_ids"]
    assert loaded(prompts[:20], truncation=True, max_length=16)["input_ids"] == truncated
    ids = tok(texts)["input_ids"]
    assert loaded.batch_decode(ids, skip_special_tokens=True) == tok.batch_decode(ids, skip_special_tokens=True)


def test_is_chatglm2_tokenizer_dir(saved, tmp_path):
    from ptune.chatglm2.tokenizer import is_chatglm2_tokenizer_dir

    assert is_chatglm2_tokenizer_dir(MODEL_DIR)
    assert not is_chatglm2_tokenizer_dir(saved[0])
    assert not is_chatglm2_tokenizer_dir(tmp_path)  # no tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text("not json", encoding="utf-8")
    assert not is_chatglm2_tokenizer_dir(tmp_path)
    assert not is_chatglm2_tokenizer_dir(tmp_path / "missing")


def test_refuses_a_model_it_cannot_reproduce(tmp_path):
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2

    from ptune.chatglm2.tokenizer import build_chatglm2_tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(TOKENIZER_MODEL.read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    changed = tmp_path / "tokenizer.model"
    changed.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="remove_extra_whitespaces"):
        build_chatglm2_tokenizer(changed)


def test_decode_keeping_special_tokens_matches_the_original(sp, tok, saved, dev_texts):
    """The original maps every special id to an empty piece, so decode without skip_special_tokens drops them too."""
    prompts, answers = dev_texts
    ids = [PREFIX + a + b + [2] for a, b in zip(sp.encode(prompts[:50]), sp.encode(answers[:50]), strict=True)]
    expected = [sp.decode(non_special(x)) for x in ids]
    assert tok.batch_decode(ids, skip_special_tokens=False) == expected
    assert saved[1].batch_decode(ids, skip_special_tokens=False) == expected  # survives save_pretrained
    mixed = [0, 0, GMASK, SOP] + sp.encode("你好 world") + [1, MASK, SMASK] + sp.encode("\nsop 再见") + [EOP, 2]
    assert tok.decode(mixed) == sp.decode(non_special(mixed)) == "你好 world \nsop 再见"
    assert tok.decode([GMASK, SOP, 2]) == ""
    assert tok.convert_ids_to_tokens([GMASK, SOP, 2]) == ["[gMASK]", "sop", "</s>"]  # tokens keep their names


def test_streamed_text_grows_into_the_whole_decode_from_a_short_window(sp, tok, dev_texts):
    from ptune.inference.generation import decode
    from tests.conftest import streamed

    mixed = ["😀 ok\n👨 a 𠀀 end", "  spaced   out  ", "Hello世界, mixed 中文 English text!\n\n价格199元"]
    texts = [*dev_texts[1][:200], *mixed]
    for answer in texts:
        ids = sp.encode(answer)
        shown, longest = streamed(tok, ids)
        final = decode(tok, ids)
        assert shown[-1] == final, answer  # word-start spaces, newlines and byte-encoded characters come out right
        assert all(final.startswith(s) for s in shown), answer  # never shows what it takes back
        assert "\ufffd" not in "".join(shown), answer  # a half-decoded character is held back, not shown
        assert longest <= 8, (answer, longest)  # a window of the newest tokens, not the whole answer
    assert max(len(sp.encode(a)) for a in texts) > 60
