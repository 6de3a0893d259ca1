"""``ptune estimate``: parameter counts derived from configs, the activation formula, and the CLI table."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GlmForCausalLM

from ptune.chatglm2.conversion import glm_config
from ptune.cli import main as cli
from ptune.model.prefix import PrefixEncoder, PrefixShape, PrefixTunedModel
from ptune.training import estimate as est
from tests.conftest import SHARED, TINY_GLM, tiny_config

REAL = SHARED / "models" / "chatglm2-6b-files"
CHATGLM2 = est.ModelShape.from_config(est.chatglm2_6b_config(), name="chatglm2-6b")


def test_chatglm2_parameter_count_matches_the_published_checkpoint():
    # The original fp16 shards hold 12,487,168,064 bytes: every parameter plus the 32-element rotary inv_freq.
    assert CHATGLM2.inv_freq_elements == 32
    assert CHATGLM2.parameters + CHATGLM2.inv_freq_elements == 6_243_584_032
    assert 2 * (CHATGLM2.parameters + CHATGLM2.inv_freq_elements) == 12_487_168_064
    assert est.prefix_parameters(CHATGLM2, 128) == 1_835_008  # 128 x 28 layers x 2 x 2 kv heads x 128


@pytest.mark.skipif(not (REAL / "config.json").exists(), reason="needs ../shared/models/chatglm2-6b-files")
def test_real_config_file_gives_the_same_shape_and_the_index_total():
    from_file = est.load_shape(str(REAL))
    assert {**vars(from_file), "name": "x"} == {**vars(CHATGLM2), "name": "x"}
    assert est.is_chatglm2_6b(from_file)
    index = json.loads((REAL / "pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["total_size"] == 2 * (from_file.parameters + from_file.inv_freq_elements)


@pytest.mark.parametrize("arch", ["glm", "llama"])
def test_parameter_count_equals_the_built_model(arch):
    model_cls, config = tiny_config(arch, vocab_size=300)
    with torch.device("meta"):
        model = model_cls(config)
    shape = est.ModelShape.from_config(config.to_dict())
    assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_shrunk_chatglm2_config_counts_like_its_native_model():
    original = {**est.chatglm2_6b_config(), "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    original.update(kv_channels=16, ffn_hidden_size=96, padded_vocab_size=500)
    with torch.device("meta"):
        model = GlmForCausalLM(glm_config(original))
    assert est.ModelShape.from_config(original).parameters == sum(p.numel() for p in model.parameters())


def test_quantised_weights_shrink_only_the_layers():
    fp16, int8, int4 = (CHATGLM2.weight_bytes(base) for base in est.BASES)
    assert fp16 == 2 * CHATGLM2.parameters
    unquantised = 2 * (CHATGLM2.parameters - CHATGLM2.layers * CHATGLM2.layer_linear_weights)
    assert int8 > CHATGLM2.layers * CHATGLM2.layer_linear_weights + unquantised > int4 > unquantised
    assert unquantised / est.GiB == pytest.approx(0.99, abs=0.01)  # embedding + output layer stay fp16


def test_estimate_grows_linearly_with_batch():
    by_batch = [est.estimate(CHATGLM2, batch=b, seq=193, prefix=128) for b in (1, 2, 3)]
    for name in ("training, no checkpointing", "training, gradient checkpointing"):
        totals = [e.total(name, "int4") for e in by_batch]
        assert totals[2] - totals[1] == pytest.approx(totals[1] - totals[0])
        assert totals[1] > totals[0]
    chunk = est.chunk_tokens(CHATGLM2.vocab) * CHATGLM2.vocab * (2 + 4 + 2)  # one loss chunk, whatever the batch
    for checkpointing in (False, True):
        one, two = (est.activation_bytes(CHATGLM2, b, 193, 128, checkpointing) - chunk for b in (1, 2))
        assert two == pytest.approx(2 * one)


@pytest.mark.parametrize("seq", [64, 193, 1024])
def test_checkpointing_reduces_activations(seq):
    for shape in (CHATGLM2, est.load_shape(str(TINY_GLM))):
        with_ckpt = est.activation_bytes(shape, 1, seq, 128, checkpointing=True)
        assert with_ckpt < est.activation_bytes(shape, 1, seq, 128, checkpointing=False)
    e = est.estimate(CHATGLM2, 1, seq, 128)
    assert e.total("training, gradient checkpointing", "fp16/bf16") < e.total("training, no checkpointing", "fp16/bf16")


def test_projection_adds_its_mlp_and_optimizer_state():
    plain, projected = est.estimate(CHATGLM2), est.estimate(CHATGLM2, projection=True)
    mlp = 2 * CHATGLM2.layers * 2 * CHATGLM2.kv_width * CHATGLM2.hidden  # two kv_size x hidden matrices
    extra = projected.total("training, no checkpointing", "int4") - plain.total("training, no checkpointing", "int4")
    assert extra > 16 * mlp  # fp32 weights + gradients + two AdamW moments


def test_activation_formula_matches_what_autograd_keeps():
    """The per-layer formula against the tensors autograd actually saves for a small bf16 GLM with ptune's prefix."""
    original = {**est.chatglm2_6b_config(), "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4}
    original.update(kv_channels=32, ffn_hidden_size=344, padded_vocab_size=1000)
    shape = est.ModelShape.from_config(original)
    torch.manual_seed(0)
    base = GlmForCausalLM(glm_config(original)).to(torch.bfloat16)
    base.set_attn_implementation("sdpa")
    prefix = PrefixEncoder(PrefixShape.from_config(base.config), 16)
    model = PrefixTunedModel(base, prefix, logits_multiple_of=32).train()  # as with dataset.pad_to_multiple_of=32
    batch, seq = 2, 40
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = max(saved.get(ptr, 0), tensor.untyped_storage().nbytes())
        return tensor

    ids = torch.randint(3, 1000, (batch, seq))
    labels = ids.clone()
    labels[:, :16] = -100  # a 16-token prompt: positions 15..38 predict the 24 labels
    labelled = seq - 16
    assert est.logit_positions(seq, labelled) == 32  # the last 25 positions predict a label (or nothing): 32 kept
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels)
    # Autograd keeps the chunked loss's input gradient of the labelled positions (2 x 24, rounded up to 64); the
    # estimate adds one chunk's logits, alive at the loss but not saved for backward.
    layers = shape.layers * est.layer_activation_bytes(shape, batch, seq, 16)
    assert sum(saved.values()) == pytest.approx(layers + 64 * shape.hidden * 2, rel=0.02)
    assert est.activation_bytes(shape, batch, seq, 16, checkpointing=False, labelled=labelled) == pytest.approx(
        layers + est.output_activation_bytes(shape, batch, 32)
    )


def test_cli_prints_a_table(capsys):
    assert cli(["estimate", "--model", "chatglm2-6b", "--batch", "1", "--seq", "193", "--prefix", "128"]) == 0
    out = capsys.readouterr().out
    assert "| GiB (2^30 bytes) | fp16/bf16 base | int8 base | int4 base |" in out
    rows = {line.split(" | ")[0].strip("| *") for line in out.splitlines() if line.startswith("| ")}
    for row in ("base weights (frozen)", "AdamW state (2 fp32 moments, prefix only)", "training, no checkpointing"):
        assert row in rows
    assert "| base weights (frozen) | 11.630 | 6.313 | 3.654 |" in out
    assert "6,243,584,000 parameters" in out and "Sanity anchors" in out


def test_cli_takes_a_folder_or_config_and_rejects_unknown_models(capsys, tmp_path):
    assert cli(["estimate", "--model", str(TINY_GLM)]) == 0
    assert "145,600 parameters" in capsys.readouterr().out  # = the shipped tiny-glm's parameter count
    assert cli(["estimate", "--model", str(TINY_GLM / "config.json"), "--batch", "4"]) == 0
    assert "batch 4 x seq 193" in capsys.readouterr().out
    assert cli(["estimate", "--model", str(tmp_path / "missing")]) == 1
    assert "not a known model" in capsys.readouterr().err


def test_cli_takes_hydra_style_key_value_arguments(capsys):
    assert cli(["estimate", "--model", "chatglm2-6b", "--batch", "2", "--seq", "256", "--projection"]) == 0
    dashed = capsys.readouterr().out
    assert cli(["estimate", "model=chatglm2-6b", "batch=2", "seq=256", "projection=true"]) == 0
    assert capsys.readouterr().out == dashed and "batch 2 x seq 256" in dashed
    assert cli(["estimate", "batch=2", "seq=256", "projection=false"]) == 0
    assert capsys.readouterr().out != dashed
    with pytest.raises(SystemExit, match="projection=true or projection=false"):
        cli(["estimate", "projection=maybe"])
