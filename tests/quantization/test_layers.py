"""A quantized frozen base: the original ChatGLM2 int8/int4 scheme (ours), bitsandbytes NF4, pre-quantized folders.

The pre-quantized folders are written here from the scheme's definition, in the layout of the published
``chatglm2-6b-int4`` (config.json with ``quantization_bit``, one ``pytorch_model.bin``, every layer's four linear
weights as int8 bytes plus ``weight_scale``); the reference for what they must compute is the same weights
dequantized in fp32 (as the original CPU kernel, ``extract_int4_weight_to_float``) and loaded through the plain
path.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptune.chatglm2.files import verify
from ptune.checkpoints.format import build_prefix, read_metadata
from ptune.inference.loading import load_checkpoint
from ptune.model.base import load_base_model
from ptune.model.prefix import PrefixShape, PrefixTunedModel
from ptune.quantization.kernels import dequantize_rows
from ptune.quantization.layers import QuantizedLinear, model_quantization, quantize_rows
from ptune.training.recipe import build_trainer
from tests.chatglm2.test_conversion import (
    original_config,
    random_original_weights,
    sentencepiece_model,
    write_original_folder,
)
from tests.conftest import TINY_GLM

QUANTIZED = ("query_key_value.weight", "self_attention.dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")


# -- the scheme, as the original defines it (plain Python for the bytes) -----------------------------------------
def scheme_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.half()
    scale = w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 8:
        return q, scale
    rows = [[((hi & 15) << 4 | (lo & 15)) for hi, lo in zip(r[0::2], r[1::2], strict=True)] for r in q.tolist()]
    signed = [[b - 256 if b > 127 else b for b in row] for row in rows]
    return torch.tensor(signed, dtype=torch.int8), scale


def scheme_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float16) -> torch.Tensor:
    """``q * scale`` in fp16 (the original CUDA kernel) or fp32 (its CPU kernel)."""
    if bits == 4:  # high nibble (arithmetic shift), then the sign-extended low nibble
        values = [[v for b in row for v in (b >> 4, ((b & 15) ^ 8) - 8)] for row in q.tolist()]
        q = torch.tensor(values, dtype=torch.int8)
    return q.to(dtype) * scale.to(dtype)[:, None]


def test_scheme_by_hand():
    w = torch.tensor([[-4.0, 2.0, 1.0, -0.5, 3.0, 0.0], [0.0] * 6], dtype=torch.float16)
    q4, s4 = quantize_rows(w, 4)
    assert s4.tolist() == [0.5712890625, 0.0]  # fp16(4 / 7); an all-zero row: scale 0
    # q = round(w / scale) in fp16: -7.0017 -> -7, 3.5 -> 4 (half to even), 1.75 -> 2, -0.875 -> -1, 5.25 -> 5, 0
    # bytes: (-7 << 4 | 4) = 0x94, (2 << 4 | -1 & 15) = 0x2f, (5 << 4 | 0) = 0x50
    assert q4.tolist() == [[0x94 - 256, 0x2F, 0x50], [0, 0, 0]]
    back = dequantize_rows(q4, s4, 4, torch.float16)
    # q * scale rounded to fp16: -3.9990234375 -> -4.0 and 2.8564453125 -> 2.85546875 (ties to even)
    assert back.tolist() == [[-4.0, 2.28515625, 1.142578125, -0.5712890625, 2.85546875, 0.0], [0.0] * 6]
    exact = dequantize_rows(q4, s4, 4, torch.float32)  # in fp32 the product is exact, nothing rounded
    assert exact.tolist() == [[-3.9990234375, 2.28515625, 1.142578125, -0.5712890625, 2.8564453125, 0.0], [0.0] * 6]
    q8, s8 = quantize_rows(w, 8)
    assert s8.tolist() == [0.031494140625, 0.0] and q8.tolist() == [[-127, 64, 32, -16, 95, 0], [0] * 6]
    assert not torch.isnan(dequantize_rows(q8, s8, 8, torch.float32)).any()


@pytest.mark.parametrize("bits", [4, 8])
def test_scheme_matches_its_definition_on_a_random_matrix(bits):
    w = (torch.randn(24, 38, generator=torch.Generator().manual_seed(bits)) * 0.1).half()
    w[5] = 0  # an all-zero row
    q, scale = quantize_rows(w, bits)
    ref_q, ref_scale = scheme_quantize(w, bits)
    ref_q[5], ref_scale[5] = 0, 0  # the original divides 0 by 0 there; ours gives 0, not NaN
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    back = dequantize_rows(q, scale, bits, torch.float16)
    assert torch.equal(back, scheme_dequantize(ref_q, ref_scale, bits)) and not torch.isnan(back).any()
    exact = dequantize_rows(q, scale, bits, torch.float32)
    assert torch.equal(exact, scheme_dequantize(ref_q, ref_scale, bits, torch.float32))
    assert (back - w).abs().max() <= scale.max() / 2 + 1e-3  # within half a step of the original


def test_int4_refuses_an_odd_column_count():
    with pytest.raises(ValueError, match=r"int4 packs two columns per byte.*\(3, 5\).*odd number of columns"):
        quantize_rows(torch.ones(3, 5), 4)


def test_quantized_linear_computes_with_the_dequantized_weight_and_gives_input_gradients_only():
    linear = torch.nn.Linear(16, 8)
    layer = QuantizedLinear.from_linear(linear, 4)
    x = torch.randn(3, 16, requires_grad=True)
    out = layer(x)
    weight = dequantize_rows(layer.weight, layer.weight_scale, 4, torch.float32)
    assert torch.allclose(out, x @ weight.T + linear.bias, atol=1e-6)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.ones(3, 8) @ weight, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters()) and layer.weight.dtype == torch.int8


# -- pre-quantized original folders --------------------------------------------------------------------------------
def write_quantized_folder(folder: Path, config: dict, weights: dict, tokenizer: Path, bits: int) -> dict:
    """The published quantized layout; returns the same weights dequantized in fp32, for the reference folder."""
    folder.mkdir(parents=True)
    stored, dequantized = {}, {}
    for name, tensor in weights.items():
        if name.endswith(QUANTIZED):
            q, scale = scheme_quantize(tensor, bits)
            stored |= {name: q, f"{name}_scale": scale}
            dequantized[name] = scheme_dequantize(q, scale, bits, torch.float32)
        else:
            stored[name] = dequantized[name] = tensor
    torch.save(stored, folder / "pytorch_model.bin")  # one file, no index, as published (a test fixture)
    (folder / "config.json").write_text(json.dumps({**config, "quantization_bit": bits}))
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return dequantized


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def prequantized(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"chatglm2-int{request.param}")
    tokenizer, vocab = sentencepiece_model(root)
    config = original_config(vocab)
    dequantized = write_quantized_folder(
        root / "quantized", config, random_original_weights(config), tokenizer, request.param
    )
    reference = write_original_folder(root / "dequantized", config, dequantized, tokenizer)
    return root / "quantized", reference, request.param


def test_prequantized_folder_computes_what_its_dequantized_weights_compute(prequantized):
    folder, reference, bits = prequantized
    ours, expected = load_base_model(folder, "float32"), load_base_model(reference, "float32")
    assert model_quantization(ours) == f"int{bits}" and model_quantization(expected) is None
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear) and layer.weight.dtype == torch.int8  # never dequantized as a whole
    ids = torch.randint(3, 500, (3, 57), generator=torch.Generator().manual_seed(0))  # 171 positions
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, expected(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()  # fp32 compute: the same weights exactly
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    prompt = ids[:1, :5]
    greedy = {"max_new_tokens": 12, "do_sample": False, "min_new_tokens": 12}
    assert torch.equal(ours.generate(prompt, **greedy), expected.generate(prompt, **greedy))


def _prefix_gradient(model: PrefixTunedModel, ids: torch.Tensor) -> torch.Tensor:
    model.prefix.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return model.prefix.embedding.weight.grad.clone()


def test_prefix_trains_on_a_prequantized_folder_with_gradient_checkpointing(prequantized):
    folder, _, _ = prequantized
    base = load_base_model(folder, "float32")
    prefix = build_prefix(PrefixShape.from_config(base.config), {"length": 4, "projection": False}, 64)
    model = PrefixTunedModel(base, prefix).train()
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    plain = _prefix_gradient(model, ids)
    model.activation_checkpointing_enable()
    assert base.is_activation_checkpointing
    assert torch.allclose(_prefix_gradient(model, ids), plain, atol=1e-6) and plain.abs().sum() > 0
    optimizer = torch.optim.Adam(prefix.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_prequantized_folder_refuses_other_quantizations_and_mismatched_files(prequantized, tmp_path):
    folder, _, bits = prequantized
    other = "int8" if bits == 4 else "int4"
    with pytest.raises(ValueError, match=f"saved quantized to int{bits}.*model.quantization={other}"):
        load_base_model(folder, "float32", other)
    assert "every tensor of 1 shard(s) has the name" in verify(folder)[0]  # one file, no index: all from config.json
    cut = shutil.copytree(folder, tmp_path / "cut")
    (cut / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes()[:-5])
    with pytest.raises(ValueError, match="cut/pytorch_model.bin: not a complete torch archive"):
        load_base_model(cut, "float32")
    lying = shutil.copytree(folder, tmp_path / "lying")  # config.json says the other bit width
    config = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**config, "quantization_bit": 12 - bits}))
    size = r".* bytes, but .* by config.json \(quantization_bit"  # the int4 file said to be int8: too small
    shapes = r"transformer.encoder.layers.0.self_attention.query_key_value.weight has shape"  # int8 said to be int4
    with pytest.raises(ValueError, match=f"lying/pytorch_model.bin: ({size}|{shapes})"):
        load_base_model(lying, "float32")


# -- model.quantization on the built-in default ---------------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["int4", "int8", "nf4"])
def test_quantized_default_trains_with_a_frozen_base(quantization, fast_cfg, tmp_path):
    overrides = ["max_steps=15", "save_steps=15", "learning_rate=5e-2", "trainer.activation_checkpointing=true"]
    cfg = fast_cfg(f"model.quantization={quantization}", *overrides)
    run = tmp_path / "run"
    trainer = build_trainer(cfg, str(run))
    base = trainer.model.base
    assert model_quantization(base) == quantization
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert evals[-1] <= 0.85 * evals[0], evals
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.prefix.parameters()}
    checkpoint = run / "checkpoint-15"
    assert read_metadata(checkpoint)["base_model"]["quantization"] == quantization
    assert model_quantization(load_checkpoint(checkpoint).model.base) == quantization  # as trained, untold
    assert model_quantization(load_checkpoint(checkpoint, quantization="none").model.base) is None


def test_quantized_run_resumes_exactly(fast_cfg, tmp_path):
    from ptune.training.recipe import train

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(fast_cfg("model.quantization=int4"), str(full))
    train(fast_cfg("model.quantization=int4", f"resume={full / 'checkpoint-3'}"), str(resumed))

    def losses_after_3(run):
        log = json.loads((run / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in log if "loss" in h and h["step"] > 3}

    assert sorted(losses_after_3(full)) == [4, 5, 6]
    assert losses_after_3(resumed) == pytest.approx(losses_after_3(full), rel=1e-6, abs=1e-7)


# -- bad input -------------------------------------------------------------------------------------------------------
def test_unknown_quantization_lists_the_options():
    with pytest.raises(
        ValueError, match=r"model.quantization='int3' is not supported; use one of null.*int8, int4, nf4"
    ):
        load_base_model(TINY_GLM, "float32", "int3")


def test_nf4_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it gives
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install -e '.\[quant\]'"):
        load_base_model(TINY_GLM, "float32", "nf4")


def test_bitsandbytes_is_imported_for_nf4_only():
    """A run that never asked for nf4 (the default, int4, evaluation, the front ends) does not import bitsandbytes
    (whose import prints a kernel warning on some CPUs); nf4 does."""
    probe = (
        "import sys, ptune.training.recipe, ptune.evaluation.command, ptune.frontends.web, ptune.cli\n"
        "from ptune.model.base import load_base_model\n"
        f"load_base_model({str(TINY_GLM)!r}, 'float32', sys.argv[1])\n"
        "print('bitsandbytes' in sys.modules)"
    )
    for quantization, imported in (("none", "False"), ("int4", "False"), ("nf4", "True")):
        done = subprocess.run([sys.executable, "-c", probe, quantization], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().splitlines()[-1] == imported, (quantization, done.stderr[-2000:])


def test_nf4_silences_the_cpu_kernel_download_warning(caplog):
    """The warning bitsandbytes logs on import where its optional Hub kernel is missing (AVX512-BF16 CPUs) is not
    shown: the kernel serves only the CPU inference shortcut ptune turns off. Its other warnings still are."""
    load_base_model(TINY_GLM, "float32", "nf4")
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb_log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. ...")
    bnb_log.warning("another bitsandbytes warning")
    assert "gemm_4bit_forward" not in caplog.text and "another bitsandbytes warning" in caplog.text


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_estimate_counts_the_quantized_layers_as_they_are_held(quantization):
    from ptune.training.estimate import ModelShape

    shape = ModelShape.from_config(json.loads((TINY_GLM / "config.json").read_text()))
    model = load_base_model(TINY_GLM, "float32", quantization)
    held = sum(
        m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * m.weight_scale.element_size()
        for m in model.modules()
        if isinstance(m, QuantizedLinear)
    )
    assert held == shape.layers * shape.layer_linear_weights * 2 * shape.layer_weight_ratio(quantization)
