"""CPU training attention in SDPA's math kernel where the CPU has no native bf16/fp16 kernels
(ptune.model.prefix.CPU_TRAINING_SDPA): which kernel runs when, and that packed rows still give the loss and prefix
gradients of the unpacked rows under SDPA's own kernel."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

import ptune.model.prefix as prefix_module
from ptune.data.packing import PackingCollator
from tests.model.test_prefix import ARCHS, build, rows_of

FLASH_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
FLASH_FORWARD = "aten::_scaled_dot_product_flash_attention_for_cpu"


def kernels(run) -> set[str]:
    with profile() as prof:
        run()
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_cpu_training_uses_the_math_kernel_only_without_native_bf16(native_bf16, monkeypatch):
    monkeypatch.setitem(prefix_module.HALF_SUPPORT, torch.bfloat16, lambda: native_bf16)
    model = build("glm").train()
    model.base.to(torch.bfloat16)  # the frozen base in bf16, the prefix stays fp32 (as model.dtype=bfloat16)
    rows = PackingCollator(13, pad_token_id=0)(rows_of([7, 5, 9, 3]))
    trained = kernels(lambda: model(**rows).loss.backward())
    assert ("aten::_scaled_dot_product_attention_math" in trained) is not native_bf16
    assert (FLASH_BACKWARD in trained) is native_bf16
    with torch.no_grad():  # forward only: SDPA's own (flash) kernel either way
        inferred = kernels(lambda: model.eval()(**rows))
    assert FLASH_FORWARD in inferred and "aten::_scaled_dot_product_attention_math" not in inferred


def loss_and_grads(model, call, **inputs):
    model.zero_grad()
    out = call(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "kv_heads"), ARCHS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_in_the_math_kernel_equal_unpacked_rows_in_sdpas_own(arch, kv_heads, checkpointing, monkeypatch):
    """The reference is computed with SDPA's own kernel choice (the flash kernel on CPU), the unpacked rows padded
    to the longest through the base's full logits; the packed rows then run in the math kernel (here in fp32, as if
    fp32 had no native kernel, so that the two kernels can be compared at fp32 precision)."""
    monkeypatch.setitem(prefix_module.HALF_SUPPORT, torch.float32, lambda: False)
    model = build(arch, kv_heads, projection=True).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    rows = rows_of([7, 5, 9, 3])
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    with monkeypatch.context() as patch:
        patch.setattr(prefix_module, "CPU_TRAINING_SDPA", None)
        assert FLASH_BACKWARD in kernels(lambda: model.base(input_ids=ids, attention_mask=mask).logits.sum().backward())
        plain, plain_grads = loss_and_grads(
            model, model.base, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items
        )
    packed = PackingCollator(13, pad_token_id=0)(rows)
    assert "aten::_scaled_dot_product_attention_math" in kernels(lambda: model(**packed).loss.backward())
    loss, grads = loss_and_grads(model, model, **packed, num_items_in_batch=num_items)
    torch.testing.assert_close(loss, plain)
    assert plain_grads.keys() == grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)
