"""The prefix on two architectures (GLM, Llama) and with MQA/GQA: shapes, positions, masks, checkpointing, generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptune.model.chunked_loss as chunked_loss
import ptune.model.prefix as prefix_module
from ptune.data.packing import PackingCollator, pack_rows
from ptune.model.prefix import PrefixEncoder, PrefixShape, PrefixTunedModel
from tests.conftest import tiny_config

LENGTH = 5


def build(arch: str, kv_heads: int = 2, projection: bool = False, seed: int = 0) -> PrefixTunedModel:
    torch.manual_seed(seed)
    model_cls, config = tiny_config(arch, vocab_size=97, kv_heads=kv_heads)
    base = model_cls(config).eval()
    prefix = PrefixEncoder(PrefixShape.from_config(config), LENGTH, projection=projection, projection_hidden_size=24)
    with torch.no_grad():  # a prefix large enough to matter, so the tests below can fail
        prefix.embedding.weight.normal_(0, 1.0)
    return PrefixTunedModel(base, prefix).eval()


ARCHS = [("glm", 2), ("llama", 2), ("llama", 1), ("glm", 4)]


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize(("arch", "kv_heads"), ARCHS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_shape_follows_the_config(arch, kv_heads, projection):
    model = build(arch, kv_heads, projection)
    kv = model.prefix()
    assert kv.shape == (2, 2, kv_heads, LENGTH, 16)  # layers, key/value, kv heads, length, head dim
    assert model.prefix.embedding.weight.shape == (LENGTH, 2 * 2 * kv_heads * 16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prefix.embedding.weight"} | (
        {"prefix.trans.0.weight", "prefix.trans.0.bias", "prefix.trans.2.weight", "prefix.trans.2.bias"}
        if projection
        else set()
    )
    assert trainable == expected


def test_prefix_row_layout_is_layer_then_key_value_then_head_then_channel():
    model = build("glm")
    with torch.no_grad():
        model.prefix.embedding.weight.copy_(torch.arange(LENGTH * 128, dtype=torch.float).view(LENGTH, 128))
    kv = model.prefix()
    # row 3, layer 1, value (1), head 0, channel 5 -> column ((1 * 2 + 1) * 2 + 0) * 16 + 5
    assert kv[1, 1, 0, 3, 5].item() == 3 * 128 + ((1 * 2 + 1) * 2 + 0) * 16 + 5


@pytest.mark.parametrize(("arch", "kv_heads"), ARCHS)
def test_prefix_changes_the_output(arch, kv_heads):
    model = build(arch, kv_heads)
    ids, mask = batch()
    with torch.no_grad():
        with_prefix = model(input_ids=ids, attention_mask=mask).logits
        model._active.kv = None  # what the bare base computes
        bare = model.base.__class__.forward(model.base, input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(with_prefix, bare, atol=1e-3)


@pytest.mark.parametrize("arch", ["glm", "llama"])
def test_real_tokens_keep_positions_from_zero(arch):
    model = build(arch)
    seen = []
    model.base.model.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs.get("position_ids", args[-1])), with_kwargs=True
    )
    ids, _ = batch()
    with torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(seen[0].squeeze(0), torch.arange(ids.shape[1]))


@pytest.mark.parametrize("arch", ["glm", "llama"])
def test_prefix_keys_are_unrotated_and_visible_to_every_token(arch, monkeypatch):
    model = build(arch)
    calls = []
    real_sdpa = prefix_module.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, key.detach().clone(), value.detach().clone(), attention_mask.clone()))
        return real_sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(prefix_module, "sdpa_attention_forward", spy)
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        kv = model.prefix()
    assert [c[0] for c in calls] == [0, 1]
    for layer, key, value, attention_mask in calls:
        expected_key = kv[layer, 0].unsqueeze(0).expand(ids.shape[0], -1, -1, -1)
        assert torch.equal(key[:, :, :LENGTH], expected_key)  # exactly the table: no rotary applied
        assert torch.equal(value[:, :, :LENGTH], kv[layer, 1].unsqueeze(0).expand(ids.shape[0], -1, -1, -1))
        assert attention_mask.shape[-1] == LENGTH + ids.shape[1]
        assert attention_mask[..., :LENGTH].all()  # every query (padding rows too) sees every prefix position
        # after the prefix: causal and padding-aware as without a prefix
        real = attention_mask[..., LENGTH:]
        assert not real[1, 0, 5, :3].any() and real[1, 0, 5, 3:6].all() and not real[1, 0, 5, 6:].any()


@pytest.mark.parametrize(("arch", "kv_heads"), ARCHS)
def test_gradient_checkpointing_gives_equal_gradients(arch, kv_heads):
    model = build(arch, kv_heads, projection=True).train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.base.is_activation_checkpointing
    checkpointed = grads()
    assert set(plain) == set(checkpointed)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, checkpointed[name], rtol=1e-5, atol=1e-7), name
    assert all(p.grad is None for p in model.base.parameters())


@pytest.mark.parametrize(("arch", "kv_heads"), ARCHS)
def test_batched_generate_equals_stepwise_forward(arch, kv_heads):
    model = build(arch, kv_heads)
    ids, mask = batch()
    steps = 6
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        # reference: full forward passes without a cache, one token at a time, positions from the mask
        tokens, attention = ids, mask
        for _ in range(steps):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=tokens, attention_mask=attention, position_ids=positions, use_cache=False).logits
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            attention = torch.cat([attention, torch.ones_like(next_token)], dim=1)
    assert torch.equal(generated, tokens)


def test_left_padding_does_not_change_a_row():
    model = build("glm")
    ids, mask = batch()
    with torch.no_grad():
        alone = model(input_ids=ids[1:2, 3:]).logits
        padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.allclose(alone[0], padded[1, 3:], atol=1e-5)


def test_prefix_from_another_model_is_refused():
    model_cls, config = tiny_config("glm", vocab_size=97, kv_heads=1)
    prefix = PrefixEncoder(PrefixShape(num_layers=2, num_kv_heads=2, head_dim=16), LENGTH)
    with pytest.raises(ValueError, match="belongs to another model"):
        PrefixTunedModel(model_cls(config), prefix)


@pytest.mark.parametrize(("arch", "kv_heads"), ARCHS)
@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("path", ["chunked", "kept_logits"])
def test_loss_on_labelled_positions_equals_the_full_logits_loss(arch, kv_heads, num_items, path, monkeypatch):
    """The output layer runs only where a label is predicted; loss and prefix gradients are those of the full logits
    (the base's own loss on all positions), also with the trainer's num_items_in_batch (gradient accumulation):
    through ptune.model.chunked_loss (chunks of 4 tokens here, so several) and through transformers' own head."""
    if path == "kept_logits":
        monkeypatch.setattr(prefix_module, "CHUNKED_LOSS_MODELS", frozenset())
    monkeypatch.setattr(chunked_loss, "chunk_tokens", lambda vocab_size: 4)
    model = build(arch, kv_heads, projection=True).train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt: no labels on the first positions of every row
    labels[0, 6] = -100  # and a hole inside one row's answer
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    def loss_and_grads(full: bool):
        model.zero_grad()
        if full:  # the base alone: logits at every position, its own shift and loss
            out = model.base(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        else:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.logits_multiple_of = 2
    full, full_grads = loss_and_grads(full=True)
    kept, kept_grads = loss_and_grads(full=False)
    assert full.logits.shape[1] == ids.shape[1] == 9
    if path == "kept_logits":
        # positions 3..7 predict the labelled tokens 4..8; position 8 predicts nothing: 6 positions, a multiple of 2
        assert kept.logits.shape[1] == 6
        torch.testing.assert_close(kept.logits, full.logits[:, 3:])
    else:
        assert kept.logits is None  # no logits tensor for the whole batch exists
    torch.testing.assert_close(kept.loss, full.loss)
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the same loss without the gradient work
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss, full.loss)


def rows_of(lengths: list[int], seed: int = 3) -> list[dict[str, list[int]]]:
    """Training rows as the tokeniser lays them out: a prompt without labels, then labelled answer tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(3, 97, (length,), generator=gen).tolist()
        prompt = max(1, length // 3)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


@pytest.mark.parametrize(("arch", "kv_heads"), ARCHS)
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("pack_length", [12, 13])  # bins exactly full; bins with a padding tail
def test_packed_rows_give_the_loss_and_gradients_of_unpacked_rows(arch, kv_heads, checkpointing, pack_length):
    """Four rows packed into two sequences: each row sees only itself and the prefix, positions restart at 0, so the
    loss and prefix gradients equal those of the plain path (the base's full logits, rows padded to the longest)."""
    model = build(arch, kv_heads, projection=True).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    rows = rows_of([7, 5, 9, 3])
    packed = PackingCollator(pack_length, pad_token_id=0)(rows)
    assert packed["input_ids"].shape == (2, pack_length)
    assert packed["position_ids"][0, :12].tolist() == [*range(9), *range(3)]  # rows 2 and 3 share a sequence
    assert packed["position_ids"][1, :12].tolist() == [*range(7), *range(5)]  # rows 0 and 1 the other
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()))

    def loss_and_grads(**inputs):
        model.zero_grad()
        out = inputs.pop("call")(**inputs, num_items_in_batch=num_items)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_grads = loss_and_grads(call=model.base, input_ids=ids, attention_mask=mask, labels=labels)
    loss, grads = loss_and_grads(call=model, **packed)
    torch.testing.assert_close(loss, plain)
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def test_packing_first_fit_by_decreasing_length():
    assert pack_rows([7, 5, 9, 3], 12) == [[2, 3], [0, 1]]
    assert pack_rows([20, 4, 4], 12) == [[0], [1, 2]]  # a row longer than the bin stays alone
    batch = PackingCollator(12, pad_token_id=0)(rows_of([20, 4]))
    assert batch["input_ids"].shape == (2, 20)  # sequences as wide as the longest row
    assert batch["labels"][1, 0] == -100 and batch["labels"][1, 4:].eq(-100).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_gives_ignored_rows_no_gradient(dtype):
    """Rows with target -100 (the padding to logits_multiple_of repeats a labelled position's hidden state) get a
    zero input gradient, inside a chunk and as a whole chunk: loss and gradient equal autograd's through the layer."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 50, bias=True).to(dtype).requires_grad_(False)
    hidden = torch.randn(10, 8, dtype=dtype)
    targets = torch.tensor([3, -100, 7, 7, -100, 1, -100, -100, -100, -100])  # chunks of 3: the 3rd all ignored

    def loss_and_grad(chunked: bool):
        h = hidden.clone().requires_grad_(True)
        if chunked:
            loss = chunked_loss.linear_cross_entropy(h, layer, targets, chunk=3)
        else:
            loss = nn.functional.cross_entropy(layer(h).float(), targets, ignore_index=-100)
        loss.backward()
        return loss, h.grad

    (loss, grad), (ref_loss, ref_grad) = loss_and_grad(True), loss_and_grad(False)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert (grad[targets == -100] == 0).all()
