"""ChatGLM2 in its original file layout: converted on load, same numbers as the original computation.

The original remote code cannot run here, so ``original_forward`` below recomputes ChatGLM2 from its definition
(RMSNorm, fused QKV with bias, rotary on the first half of each head with interleaved pairs, multi-query
attention, SwiGLU, untied output layer, P-tuning prefix as past keys/values without rotary); the native model
loaded by ptune must match it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptune.chatglm2 import conversion as chatglm2
from ptune.chatglm2 import files as chatglm2_files
from ptune.checkpoints.format import read_metadata
from ptune.cli import main as cli
from ptune.inference.loading import load_checkpoint
from ptune.model.base import load_base_model, load_tokenizer
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, SHARED, compose_train

REAL = SHARED / "models" / "chatglm2-6b-files"
SMALL = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "kv_channels": 16, "ffn_hidden_size": 96}


def sentencepiece_model(folder: Path) -> tuple[Path, int]:
    """The real tokenizer.model when ../shared has it, else a small BPE model trained on the synthetic data."""
    if (REAL / "tokenizer.model").exists():
        shutil.copy(REAL / "tokenizer.model", folder / "tokenizer.model")
        return folder / "tokenizer.model", 65024
    import sentencepiece as spm

    text = folder / "corpus.txt"
    lines = [
        json.loads(x)["summary"] for x in (REPO / "data/synthetic_adgen/train.json").read_text("utf-8").splitlines()
    ]
    text.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as ChatGLM2's model
    )  # fmt: skip
    return folder / "tokenizer.model", 640


def original_config(vocab: int, **changes) -> dict:
    """The real ChatGLM2-6B config.json (or its published values), shrunk."""
    base = json.loads((REAL / "config.json").read_text()) if (REAL / "config.json").exists() else {
        "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True, "layernorm_epsilon": 1e-05,
        "multi_query_attention": True, "multi_query_group_num": 2, "original_rope": True, "post_layer_norm": True,
        "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "seq_length": 32768,
        "torch_dtype": "float16", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    return {**base, **SMALL, "padded_vocab_size": vocab, **changes}


def random_original_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, f, v = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    d, g, heads = config["kv_channels"], config["multi_query_group_num"], config["num_attention_heads"]

    def rand(*shape, scale=0.08):
        return (torch.randn(*shape, generator=gen) * scale).half()

    sd = {"transformer.embedding.word_embeddings.weight": rand(v, h, scale=0.5)}
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": (1 + rand(h)).half(),
            p + "self_attention.query_key_value.weight": rand(heads * d + 2 * g * d, h),
            p + "self_attention.query_key_value.bias": rand(heads * d + 2 * g * d),
            p + "self_attention.dense.weight": rand(h, heads * d),
            p + "post_attention_layernorm.weight": (1 + rand(h)).half(),
            p + "mlp.dense_h_to_4h.weight": rand(2 * f, h),
            p + "mlp.dense_4h_to_h.weight": rand(h, f),
        }
    rot = d // 2
    sd["transformer.encoder.final_layernorm.weight"] = (1 + rand(h)).half()
    sd["transformer.output_layer.weight"] = rand(v, h)
    sd["transformer.rotary_pos_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()
    return sd


def write_original_folder(folder: Path, config: dict, weights: dict[str, torch.Tensor], tokenizer: Path) -> Path:
    """The original download layout: config.json, tokenizer.model, sharded pytorch_model-*.bin with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if tokenizer != folder / "tokenizer.model":
        shutil.copy(tokenizer, folder / "tokenizer.model")
    names = list(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for number, part in enumerate(shards, 1):
        shard = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        torch.save({n: weights[n] for n in part}, folder / shard)  # the original format (a test fixture)
        weight_map |= dict.fromkeys(part, shard)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / chatglm2_files.INDEX_FILE).write_text(json.dumps(index))
    return folder


def original_forward(sd, config, ids, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """ChatGLM2's computation from its definition, in float32. ``prefix``: the original P-tuning past key/values,
    ``[layers, 2, groups, pre_seq_len, head_dim]``, attended by every token, no rotary, positions from 0."""
    w = {k: t.float() for k, t in sd.items()}
    eps, d, heads, g = config["layernorm_epsilon"], config["kv_channels"], config["num_attention_heads"], 0
    g = config["multi_query_group_num"]
    b, s = ids.shape

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    rot = d // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    angles = torch.outer(torch.arange(s).float(), inv_freq)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def rope(x):  # [b, s, n, d]: pairs (0,1), (2,3), ... of the first `rot` channels rotate
        pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
        a, c = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - c * sin, c * cos + a * sin], dim=-1).flatten(-2)
        return torch.cat([rotated, x[..., rot:]], dim=-1)

    hidden = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms(hidden, w[p + "input_layernorm.weight"])
        qkv = x @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * d, g * d, g * d], dim=-1)
        q, k, v = q.view(b, s, heads, d), k.view(b, s, g, d), v.view(b, s, g, d)
        q, k = rope(q), rope(k)
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        if prefix is not None:
            pk = prefix[i, 0].permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
            pv = prefix[i, 1].permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
            mask = torch.cat([torch.ones(s, prefix.shape[3], dtype=torch.bool), mask], dim=1)
        k, v = k.repeat_interleave(heads // g, dim=2), v.repeat_interleave(heads // g, dim=2)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        attn = torch.einsum("bnqk,bknd->bqnd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
        hidden = hidden + attn.reshape(b, s, heads * d) @ w[p + "self_attention.dense.weight"].T
        x = rms(hidden, w[p + "post_attention_layernorm.weight"])
        gate, up = (x @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        hidden = hidden + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    hidden = rms(hidden, w["transformer.encoder.final_layernorm.weight"])
    return hidden @ w["transformer.output_layer.weight"].T


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm2")
    tokenizer, vocab = sentencepiece_model(root)
    config = original_config(vocab)
    weights = random_original_weights(config)
    return write_original_folder(root / "chatglm2-small", config, weights, tokenizer), config, weights


def test_native_config_sets_every_field_from_the_original():
    if not (REAL / "config.json").exists():
        pytest.skip("../shared is absent")
    native = chatglm2.glm_config(json.loads((REAL / "config.json").read_text()))
    assert (native.vocab_size, native.hidden_size, native.intermediate_size) == (65024, 4096, 13696)
    assert (native.num_hidden_layers, native.num_attention_heads, native.num_key_value_heads) == (28, 32, 2)
    assert (native.head_dim, native.rms_norm_eps) == (128, 1e-5)
    assert native.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert native.attention_bias and not native.tie_word_embeddings
    assert (native.pad_token_id, native.eos_token_id, native.bos_token_id) == (0, 2, None)


def test_converted_model_computes_what_the_original_computes(original):
    folder, config, weights = original
    model = load_base_model(folder, "float32")
    ids = torch.randint(3, 500, (2, 11))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    expected = original_forward(weights, config, ids)
    assert torch.allclose(ours, expected, atol=2e-4, rtol=1e-4), (ours - expected).abs().max()


def test_left_padded_batch_uses_positions_from_the_mask(original):
    folder, config, weights = original
    model = load_base_model(folder, "float32")
    ids = torch.randint(3, 500, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        out = model(input_ids=padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.allclose(out[:, 3:], original_forward(weights, config, ids), atol=2e-4, rtol=1e-4)


def test_refusals_are_clear(original):
    _, config, _ = original
    with pytest.raises(NotImplementedError, match="rope_ratio=16"):
        chatglm2.glm_config({**config, "rope_ratio": 16})
    with pytest.raises(NotImplementedError, match="original_rope"):
        chatglm2.glm_config({**config, "original_rope": False})


def test_integrity_checks_name_the_bad_shard(original, tmp_path):
    folder, _, _ = original
    broken = shutil.copytree(folder, tmp_path / "broken")
    shard = broken / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-5000])  # a truncated download
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00002.bin.*truncated, corrupt"):
        load_base_model(broken)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin: missing"):
        load_base_model(broken)
    assert "no shipped SHA256 manifest" in chatglm2_files.verify(folder)[0]


def test_real_index_sizes_and_manifest():
    if not (REAL / chatglm2_files.INDEX_FILE).exists():
        pytest.skip("../shared is absent")
    sizes = chatglm2_files.expected_shard_bytes(REAL)
    assert sum(sizes.values()) == json.loads((REAL / chatglm2_files.INDEX_FILE).read_text())["metadata"]["total_size"]
    assert chatglm2_files.known_manifest(REAL)["pytorch_model-00001-of-00007.bin"].startswith("cdf1bf57")


def test_verify_checks_sha256_against_the_manifest(original, tmp_path, monkeypatch):
    folder, _, _ = original
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shards = sorted(p.name for p in folder.glob("*.bin"))
    good = {name: chatglm2_files.sha256_file(folder / name) for name in shards}
    (manifests / "small.json").write_text(json.dumps({"sha256": good}))
    monkeypatch.setattr(chatglm2_files, "MANIFEST_DIR", manifests)
    assert chatglm2_files.verify(folder) == [f"{name}: OK" for name in shards]
    (manifests / "small.json").write_text(json.dumps({"sha256": {**good, shards[0]: "0" * 64}}))
    with pytest.raises(ValueError, match=f"{shards[0]}: SHA256 .* differs from the published"):
        chatglm2_files.verify(folder)
    assert cli(["verify", str(folder)]) == 1


def test_convert_command_writes_a_native_folder(original, tmp_path):
    folder, config, weights = original
    out = tmp_path / "native"
    assert cli(["convert", str(folder), str(out)]) == 0
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        native = load_base_model(out, "float32")(input_ids=ids).logits
    assert torch.allclose(native, original_forward(weights, config, ids), atol=2e-4, rtol=1e-4)
    text = "[Round 1]\n\n问：类型#裙\n\n答："
    assert load_tokenizer(out)(text)["input_ids"] == load_tokenizer(folder)(text)["input_ids"]


def test_converted_files_get_the_mode_the_umask_gives(original, tmp_path):
    folder, _, _ = original
    previous = os.umask(0o022)
    try:
        assert cli(["convert", str(folder), str(tmp_path / "native")]) == 0
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "native").iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o644}, modes  # shards too, not 0600


def test_train_and_evaluate_on_the_original_folder(original, tmp_path):
    folder, _, _ = original
    run = tmp_path / "run"
    cfg = compose_train(*FAST, "model=chatglm2-6b", f"model.path={folder}", "model.dtype=float32",
                        "max_steps=2", "save_steps=2", cache_dir=tmp_path / "cache")  # fmt: skip
    train(cfg, str(run))
    loaded = load_checkpoint(run / "checkpoint-2")
    assert loaded.tokenizer.eos_token_id == 2 and loaded.prompt_format.kind == "chatglm2"
    prompt = loaded.tokenizer("[Round 1]\n\n问：类型#裙\n\n答：")["input_ids"]
    assert prompt[:2] == [
        loaded.tokenizer.convert_tokens_to_ids("[gMASK]"),
        loaded.tokenizer.convert_tokens_to_ids("sop"),
    ]


def original_prefix_state(config: dict, length: int, projection: bool, hidden: int = 32) -> dict[str, torch.Tensor]:
    """What the original ptuning/main.py saves in pytorch_model.bin: its PrefixEncoder's tensors (random here)."""
    layers, g, d = config["num_layers"], config["multi_query_group_num"], config["kv_channels"]
    kv_size = layers * 2 * g * d
    gen = torch.Generator().manual_seed(3)
    prefix_sd = {"transformer.prefix_encoder.embedding.weight": torch.randn(length, kv_size, generator=gen)}
    if projection:
        prefix_sd |= {
            "transformer.prefix_encoder.trans.0.weight": torch.randn(hidden, kv_size, generator=gen) * 0.1,
            "transformer.prefix_encoder.trans.0.bias": torch.randn(hidden, generator=gen) * 0.1,
            "transformer.prefix_encoder.trans.2.weight": torch.randn(kv_size, hidden, generator=gen) * 0.1,
            "transformer.prefix_encoder.trans.2.bias": torch.randn(kv_size, generator=gen) * 0.1,
        }
    return prefix_sd


@pytest.mark.parametrize("projection", [False, True])
def test_original_ptuning_checkpoint_reproduces_the_original_outputs(original, tmp_path, projection):
    folder, config, weights = original
    layers, g, d = config["num_layers"], config["multi_query_group_num"], config["kv_channels"]
    length = 6
    prefix_sd = original_prefix_state(config, length, projection)
    ckpt = tmp_path / "checkpoint-3000"
    ckpt.mkdir()
    torch.save(prefix_sd, ckpt / "pytorch_model.bin")  # what the original ptuning/main.py saved
    out = tmp_path / "imported"
    assert cli(["import-ptuning", str(ckpt), "--base", str(folder), "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert (meta["prefix"]["length"], meta["prefix"]["projection"]) == (length, projection)

    # the original's get_prompt: rows -> [pre_seq_len, layers*2, groups, channels] -> [layers, 2, groups, len, ch]
    table = prefix_sd["transformer.prefix_encoder.embedding.weight"]
    if projection:
        p = "transformer.prefix_encoder.trans."
        table = torch.tanh(table @ prefix_sd[p + "0.weight"].T + prefix_sd[p + "0.bias"])
        table = table @ prefix_sd[p + "2.weight"].T + prefix_sd[p + "2.bias"]
    past = table.view(length, layers, 2, g, d).permute(1, 2, 3, 0, 4)
    loaded = load_checkpoint(out, dtype="float32")
    ids = torch.randint(3, 500, (2, 8))
    with torch.no_grad():
        ours = loaded.model(input_ids=ids).logits
    expected = original_forward(weights, config, ids, prefix=past)
    assert torch.allclose(ours, expected, atol=3e-4, rtol=1e-4), (ours - expected).abs().max()
    assert not torch.allclose(ours, original_forward(weights, config, ids), atol=1e-2)  # the prefix matters


def test_cli_help_and_a_bad_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ptune.cli", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "import-ptuning" in result.stdout
    assert cli(["import-ptuning", str(tmp_path), "--base", str(tmp_path)]) == 1


def test_a_shard_cut_by_a_few_bytes_or_damaged_inside_is_named(original, tmp_path, capsys):
    folder, _, _ = original
    broken = shutil.copytree(folder, tmp_path / "broken")
    shard = broken / "pytorch_model-00002-of-00002.bin"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-5])  # within the size check's tolerance: only the zip directory shows it
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00002.bin: not a complete torch archive"):
        load_base_model(broken)
    assert cli(["verify", str(broken)]) == 1
    assert "pytorch_model-00002-of-00002.bin: not a complete torch archive" in capsys.readouterr().err
    import zipfile

    with zipfile.ZipFile(io.BytesIO(intact)) as archive:  # garble the pickle, keep every size and the directory
        pickle_entry = next(m for m in archive.infolist() if m.filename.endswith("data.pkl"))
    start = pickle_entry.header_offset + 30 + len(pickle_entry.filename.encode()) + len(pickle_entry.extra)
    garbled = bytearray(intact)
    garbled[start : start + pickle_entry.file_size] = b"\xff" * pickle_entry.file_size
    shard.write_bytes(bytes(garbled))
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00002.bin: cannot be read as a torch archive"):
        load_base_model(broken)


def test_a_cut_prefix_file_is_named(tmp_path):
    from ptune.checkpoints.format import PREFIX_FILE, load_prefix_weights, save_prefix_checkpoint
    from ptune.checkpoints.integrity import HASHES_KEY
    from ptune.model.prefix import PrefixEncoder, PrefixShape

    prefix = PrefixEncoder(PrefixShape(2, 2, 16), length=4)
    save_prefix_checkpoint(tmp_path, prefix, {"prefix": {}, "base_model": "", "config": {}})
    meta = json.loads((tmp_path / "ptune_checkpoint.json").read_text())
    meta.pop(HASHES_KEY, None)  # as a checkpoint written before the hashes: the file itself must say it is cut
    (tmp_path / "ptune_checkpoint.json").write_text(json.dumps(meta))
    path = tmp_path / PREFIX_FILE
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{PREFIX_FILE}: truncated or corrupt \(not a readable safetensors file"):
        load_prefix_weights(tmp_path, prefix)


def test_convert_leaves_no_partial_folder(original, tmp_path, monkeypatch):
    folder, _, _ = original
    import ptune.chatglm2.tokenizer

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ptune.chatglm2.tokenizer, "save_chatglm2_tokenizer", fail)  # after every shard is written
    out = tmp_path / "native"
    with pytest.raises(OSError, match="disk full"):
        chatglm2.convert_folder(folder, out)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["convert", str(folder), str(out)]) == 1  # never into a folder that holds something
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _original_ptuning_checkpoint(folder: Path, config: dict, tensors: dict, saved_config: dict | None) -> Path:
    """What ptuning/main.py leaves: the prefix encoder's tensors and the model's config.json with pre_seq_len."""
    folder.mkdir()
    torch.save({f"transformer.prefix_encoder.{k}": v for k, v in tensors.items()}, folder / "pytorch_model.bin")
    if saved_config is not None:
        (folder / "config.json").write_text(json.dumps({**config, **saved_config}))
    return folder


def test_import_ptuning_refuses_checkpoints_of_another_shape(original, tmp_path, capsys):
    folder, config, _ = original
    layers, g, d = config["num_layers"], config["multi_query_group_num"], config["kv_channels"]
    kv_size = layers * 2 * g * d
    table = {"embedding.weight": torch.randn(8, kv_size)}
    projection = {
        "trans.0.weight": torch.randn(32, kv_size),
        "trans.0.bias": torch.randn(32),
        "trans.2.weight": torch.randn(kv_size, 16),  # another hidden width than the first linear's 32
        "trans.2.bias": torch.randn(kv_size),
    }
    cases = {
        "projection": (table | projection, {"pre_seq_len": 8, "prefix_projection": True}, "trans.2.weight"),
        "rows": (table, {"pre_seq_len": 16, "prefix_projection": False}, "config.json: pre_seq_len 16.*8 rows"),
        "split": (  # 1 layer x 4 groups x 16 channels: the same row width as 2 x 2 x 16
            table,
            {"pre_seq_len": 8, "num_layers": 1, "multi_query_group_num": 2 * g},
            f"config.json: trained on 1 layers x {2 * g} key/value groups x {d} channels",
        ),
    }
    for name, (tensors, saved, message) in cases.items():
        ckpt = _original_ptuning_checkpoint(tmp_path / name, config, tensors, saved)
        assert cli(["import-ptuning", str(ckpt), "--base", str(folder), "--out", str(tmp_path / f"{name}-out")]) == 1
        err = capsys.readouterr().err
        assert str(ckpt) in err and re.search(message, err), err
        assert not (tmp_path / f"{name}-out").exists()
    fine = {"pre_seq_len": 8, "prefix_projection": False}
    ckpt = _original_ptuning_checkpoint(tmp_path / "fine", config, table, fine)
    assert cli(["import-ptuning", str(ckpt), "--base", str(folder), "--out", str(tmp_path / "fine-out")]) == 0


def test_answers_decode_without_the_clean_up_transformers_ignores(tmp_path):
    """Issue 19.13: decoding an answer asks for no clean_up_tokenization_spaces, which transformers 5 ignores for
    this BPE tokenizer with a warning on every evaluation; the text is what the reference scores."""
    model, _ = sentencepiece_model(tmp_path)
    script = (
        "from ptune.chatglm2.tokenizer import build_chatglm2_tokenizer\n"
        "from ptune.inference.generation import decode\n"
        "from ptune.inference.streaming import TextSoFar\n"
        f"tok = build_chatglm2_tokenizer({str(model)!r})\n"
        "ids = tok('这款裙子 , 很好看 !', add_special_tokens=False)['input_ids']\n"
        "text = TextSoFar(tok, list(ids)).update()\n"
        "reference = tok.decode(ids, skip_special_tokens=True).strip()\n"
        "assert decode(tok, ids) == reference == text, (decode(tok, ids), text)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "clean_up_tokenization_spaces" not in done.stderr, done.stderr[-2000:]
