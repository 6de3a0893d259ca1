"""``BatchDecoder``'s per-slot KV cache (``ptune.inference.slots``): rows join into free slots and leave by freeing
theirs, the other rows' keys/values staying where they are, and every row answers as it does alone."""

from __future__ import annotations

import pytest
import torch

from ptune.frontends.common import compose_frontend_config, load_model
from ptune.inference.generation import BatchDecoder, GenerationSettings, encode_prompt
from tests.conftest import TINY_GLM

GREEDY = GenerationSettings(max_new_tokens=12)
SAMPLED = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.8, seed=5)


@pytest.fixture(scope="module")
def loaded():
    return load_model(compose_frontend_config([f"model.path={TINY_GLM}"]))


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    texts = ["类型#裙*颜色#红色", "类型#上衣*材质#牛仔布*颜色#蓝色*风格#简约", "类型#裤", "类型#外套*颜色#黑色"]
    return [encode_prompt(loaded, text) for text in texts]


def prefix(loaded, length: int, seed: int) -> torch.Tensor:
    """A random prefix of ``length`` positions for the tiny model: [layers, 2, kv heads, length, head dim]."""
    config = loaded.model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (config.num_hidden_layers, 2, config.num_key_value_heads, length, config.head_dim)
    return torch.randn(shape, generator=generator)


def alone(loaded, prompt, settings, others=(), row_prefix=None) -> list[int]:
    decoder = BatchDecoder(loaded, others)
    [row] = decoder.join([decoder.new_row(prompt, settings, row_prefix)])
    while not row.finish:
        decoder.step()
    return row.ids


def run_to_end(decoder: BatchDecoder) -> None:
    while decoder.rows:
        decoder.remove([r for r in decoder.rows if r.finish])
        if decoder.rows:
            decoder.step()


def test_rows_join_and_leave_in_their_own_slots_and_the_others_stay_in_place(loaded, prompts):
    decoder = BatchDecoder(loaded, slots=4, length=64)
    first, second = decoder.add(prompts[:2], [GREEDY, GREEDY])
    decoder.step()
    [third] = decoder.add([prompts[2]], [GREEDY])  # joins the running batch: slot 2, written in place
    buffers = [t.data_ptr() for t in (*decoder.cache.keys, *decoder.cache.values)]
    written = int(decoder.cache.end[1])  # the second row's columns so far
    second_keys = decoder.cache.keys[0][1, :, :written].clone()
    assert decoder.rows == [first, second, third] and decoder.cache.used == 3
    decoder.step()
    decoder.remove([first])  # its slot 0 is freed; the last row moves into it, the second stays in slot 1
    assert decoder.rows == [third, second] and decoder.cache.used == 2
    assert torch.equal(decoder.cache.keys[0][1, :, :written], second_keys)  # untouched by the join, step and leave
    [fourth] = decoder.add([prompts[3]], [GREEDY])
    assert decoder.rows == [third, second, fourth]
    assert [t.data_ptr() for t in (*decoder.cache.keys, *decoder.cache.values)] == buffers  # never reallocated
    run_to_end(decoder)
    for row, prompt in zip((second, third, fourth), prompts[1:], strict=True):
        assert row.ids == alone(loaded, prompt, GREEDY)
    assert first.ids[:2] == alone(loaded, prompts[0], GREEDY)[:2]  # it left after two tokens


def test_mixed_prefixes_and_sampled_rows_join_and_leave_at_every_step_as_alone(loaded, prompts):
    others = [prefix(loaded, 3, 0), prefix(loaded, 5, 1)]
    plan = [  # (prompt, settings, prefix): the bare base, two prefixes of different lengths, greedy and sampled
        (prompts[0], GREEDY, others[1]),
        (prompts[1], SAMPLED, None),
        (prompts[2], GREEDY, others[0]),
        (prompts[3], SAMPLED, others[1]),
        (prompts[1], GREEDY, others[0]),
        (prompts[0], GREEDY, None),
    ]
    decoder = BatchDecoder(loaded, others, slots=3, length=64)
    waiting, rows = list(plan), []
    while waiting or decoder.rows:
        decoder.remove([r for r in decoder.rows if r.finish])
        if waiting and len(decoder.rows) < 3:  # one joins a turn, into whichever slot is free
            prompt, settings, row_prefix = waiting.pop(0)
            rows += decoder.join([decoder.new_row(prompt, settings, row_prefix)])
        if decoder.rows:
            decoder.step()
    assert [r.ids for r in rows] == [alone(loaded, p, s, others, x) for p, s, x in plan]
    assert len({tuple(r.ids) for r in rows}) == len(rows)  # the prefixes and seeds do change the answers


def test_an_unsized_cache_grows_when_a_longer_row_joins_a_running_batch(loaded, prompts):
    decoder = BatchDecoder(loaded)  # sized by its first join: one slot, that row's length
    [short] = decoder.add([prompts[2]], [GenerationSettings(max_new_tokens=4)])
    decoder.step()
    [long] = decoder.add([prompts[1]], [GREEDY])
    assert decoder.cache.slots == 2 and decoder.cache.length >= len(prompts[1]) + GREEDY.max_new_tokens
    run_to_end(decoder)
    assert short.ids == alone(loaded, prompts[2], GenerationSettings(max_new_tokens=4))
    assert long.ids == alone(loaded, prompts[1], GREEDY)


class Forwards:
    """The model's forward passes during a block: how many, and each one's tokens (``[1, tokens]`` packed)."""

    def __init__(self, model) -> None:
        self.tokens: list[int] = []
        self._hook = model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, _module, _args, kwargs) -> None:
        self.tokens.append(kwargs["input_ids"].numel())

    def close(self) -> None:
        self._hook.remove()


def test_a_row_joining_a_running_batch_is_prefilled_in_the_batchs_own_step(loaded, prompts):
    decoder = BatchDecoder(loaded, slots=3, length=64)
    first, second = decoder.add(prompts[:2], [GREEDY, GREEDY])
    decoder.step()
    forwards = Forwards(loaded.model)
    try:
        [third] = decoder.join([decoder.new_row(prompts[2], GREEDY)])
        assert forwards.tokens == [] and third.ids == []  # a slot taken, nothing computed yet
        decoder.step()
    finally:
        forwards.close()
    # one forward: the two decoding rows' next tokens and the whole joining prompt, packed
    assert forwards.tokens == [2 + len(prompts[2])]
    assert (len(first.ids), len(second.ids), len(third.ids)) == (3, 3, 1)
    run_to_end(decoder)
    assert [r.ids for r in (first, second, third)] == [alone(loaded, p, GREEDY) for p in prompts[:3]]


def test_a_long_prompt_is_prefilled_in_chunks_under_step_tokens_while_the_batch_decodes(loaded, prompts):
    longer = GenerationSettings(max_new_tokens=30)
    decoder = BatchDecoder(loaded, slots=3, length=64, step_tokens=10)
    first, second = decoder.join([decoder.new_row(p, longer) for p in prompts[2:4]])
    while not (first.ids and second.ids):  # their own prompts in chunks too; then 8 prompt tokens a step left
        decoder.step()
    before = [len(first.ids), len(second.ids)]
    forwards = Forwards(loaded.model)
    try:
        [long] = decoder.join([decoder.new_row(prompts[1], GREEDY)])
        steps = -(-len(prompts[1]) // 8)
        assert steps >= 3
        for _ in range(steps):
            assert long.ids == [] and not (first.finish or second.finish)
            decoder.step()
    finally:
        forwards.close()
    assert forwards.tokens == [10] * (steps - 1) + [2 + len(prompts[1]) - 8 * (steps - 1)]
    # the running rows got a token at every step of the prefill, and the long row its first at the last one
    assert len(long.ids) == 1 and [len(first.ids), len(second.ids)] == [n + steps for n in before]
    run_to_end(decoder)
    expected = [alone(loaded, prompts[2], longer), alone(loaded, prompts[3], longer), alone(loaded, prompts[1], GREEDY)]
    assert [r.ids for r in (first, second, long)] == expected


@pytest.mark.parametrize(("prompt", "message"), [([], "empty prompt"), ([5, 10**6], "outside the vocabulary")])
def test_a_prompt_that_cannot_be_prefilled_fails_alone_before_it_joins(loaded, prompt, message):
    decoder = BatchDecoder(loaded)
    with pytest.raises(ValueError, match=message):
        decoder.new_row(prompt, GREEDY)
    assert decoder.rows == []
