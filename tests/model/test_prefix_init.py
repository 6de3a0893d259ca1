"""prefix.init: a prefix started from the base's own keys/values of a text computes, before training, what the base
computes for that text followed by the prompt; vocab draws are seeded; refusals; resume never re-initialises."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from ptune.checkpoints.config_checks import ConfigError, check_train_config
from ptune.checkpoints.format import read_metadata
from ptune.model import prefix_init
from ptune.model.prefix import PrefixEncoder, PrefixShape, PrefixTunedModel
from ptune.model.prefix_init import fill, initialise_prefix, read_init_text
from ptune.training.recipe import train
from tests.conftest import TINY_GLM, tiny_config

TEXT = "类型#裙*颜色#红色*风格#简约"
PROMPT = "类型#上衣*材质#牛仔布*图案#刺绣"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_GLM)


def random_base(arch: str, kv_heads: int, vocab: int):
    model_cls, config = tiny_config(arch, vocab, kv_heads)
    torch.manual_seed(0)
    base = model_cls(config).eval()
    with torch.no_grad():  # a sharper attention than the 0.02 initialiser gives, so positions matter
        for name, param in base.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                param.mul_(20)
    base.set_attn_implementation("sdpa")
    return base


@pytest.mark.parametrize("arch", ["glm", "llama"])
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa"])
def test_text_init_computes_what_the_base_computes_for_text_then_prompt(tokenizer, arch, kv_heads):
    base = random_base(arch, kv_heads, len(tokenizer))
    prefix = PrefixEncoder(PrefixShape.from_config(base.config), length=10)
    record = initialise_prefix(prefix, base, tokenizer, {"init": "text", "init_text": TEXT}, seed=0)
    text = record["token_ids"]
    assert record["kind"] == "text" and text == tokenizer(TEXT, add_special_tokens=False)["input_ids"][:10]
    prompt = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = base(input_ids=torch.tensor([text + prompt])).logits[:, len(text) :]
        plain = base(input_ids=torch.tensor([prompt])).logits
        ours = PrefixTunedModel(base, prefix).eval()(input_ids=torch.tensor([prompt])).logits
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    assert not torch.allclose(ours, plain, atol=1e-2)  # the text matters


def test_short_text_is_repeated_long_text_cut_and_a_file_read(tokenizer, tmp_path):
    assert fill([5, 6, 7], 7) == [5, 6, 7, 5, 6, 7, 5] and fill([5, 6, 7], 2) == [5, 6]
    (tmp_path / "init.txt").write_text(TEXT, encoding="utf-8")
    assert read_init_text(f"@{tmp_path / 'init.txt'}") == TEXT
    with pytest.raises(FileNotFoundError, match="prefix.init_text=@.*missing.txt: no such file"):
        read_init_text(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="needs prefix.init_text"):
        read_init_text("")
    with pytest.raises(ValueError, match="no tokens"):
        fill([], 4)


def test_vocab_init_is_seeded_and_draws_no_special_token(tokenizer):
    base = random_base("glm", 2, len(tokenizer))
    records = []
    for seed in (1, 1, 2):
        prefix = PrefixEncoder(PrefixShape.from_config(base.config), length=32)
        records.append((initialise_prefix(prefix, base, tokenizer, {"init": "vocab"}, seed), prefix))
    (first, p1), (again, p2), (other, _) = records
    assert first == again and torch.equal(p1.embedding.weight, p2.embedding.weight)
    assert first["token_ids"] != other["token_ids"]
    assert not set(first["token_ids"]) & set(tokenizer.all_special_ids)


def test_text_init_with_a_projection_is_refused(tokenizer, fast_cfg):
    base = random_base("glm", 2, len(tokenizer))
    prefix = PrefixEncoder(PrefixShape.from_config(base.config), length=4, projection=True, projection_hidden_size=8)
    with pytest.raises(ValueError, match="prefix.init=text needs prefix.projection=false"):
        initialise_prefix(prefix, base, tokenizer, {"init": "text", "init_text": TEXT}, seed=0)
    cases = {
        ("prefix.init=text", "prefix.init_text=abc", "prefix.projection=true"): "needs prefix.projection=false",
        ("prefix.init=text",): "prefix.init=text: set prefix.init_text",
        ("prefix.init=vocab", "init_from=/x"): "prefix.init=vocab and init_from both set",
        ("prefix.init=words",): r"prefix.init='words': must be one of random, text, vocab",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_train_config(fast_cfg(*overrides))


def test_text_init_trains_is_recorded_and_a_resume_never_reinitialises(fast_cfg, tmp_path, monkeypatch):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    text = f"prefix.init_text='{TEXT}'"  # quoted: Hydra's grammar reserves # and *
    train(fast_cfg("prefix.init=text", text), str(full))
    history = json.loads((full / "trainer_state.json").read_text())["log_history"]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert evals[-1] < evals[0]  # it learns from there
    meta = read_metadata(full / "checkpoint-3")
    assert meta["prefix"]["init"]["kind"] == "text" and len(meta["prefix"]["init"]["token_ids"]) == 16
    assert meta["config"]["prefix"]["init_text"] == TEXT

    def fail(*args):
        raise AssertionError("a resume was initialised")

    monkeypatch.setattr(prefix_init, "base_key_values", fail)
    train(fast_cfg("prefix.init=text", text, f"resume={full / 'checkpoint-3'}"), str(resumed))
    assert read_metadata(resumed / "checkpoint-6")["prefix"]["init"] == meta["prefix"]["init"]
