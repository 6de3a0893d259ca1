"""Where a fresh prefix starts (``prefix.init``): random numbers, the base's own keys/values of a text, or of random
vocabulary tokens.

Prefix tuning is sensitive to its start (Li & Liang initialise from real words' activations; PEFT's method
comparison on MetaMathQA reports prefix tuning at 18.6% with its default start against 41.6% from 50 tokens). A
prefix is exactly a block of keys and values every real token attends to, so the frozen base can supply one: run
it once on ``prefix.length`` tokens placed at positions ``-n .. -1`` and keep every layer's keys (after rotary) and
values. Since real tokens start at position 0 and rotary attention depends only on relative positions, the prefixed
model then computes, before any training step, exactly what the base computes for those tokens followed by the
prompt (ptune's prefix keys get no rotary of their own: ``ptune.model.prefix``).

- ``random``: the table as ``nn.Embedding`` leaves it (N(0, 1)), the original P-tuning v2 start;
- ``text``: the tokens of ``prefix.init_text`` (a string, or ``@path`` to a UTF-8 file), repeated to fill
  ``prefix.length`` or cut to its first ``prefix.length`` tokens, without special tokens;
- ``vocab``: ``prefix.length`` tokens drawn uniformly (seeded by ``seed``) from the tokenizer's non-special ids.

``text``/``vocab`` write keys/values straight into the table, so they need ``prefix.projection=false`` (the
projection's input is not keys and values); ``ptune.checkpoints.config_checks`` refuses the combination.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptune.model.prefix import PrefixEncoder

logger = logging.getLogger(__name__)

INITS = ("random", "text", "vocab")


def read_init_text(init_text: str | None) -> str:
    """``prefix.init_text`` as text: ``@path`` reads that UTF-8 file; an empty text is refused."""
    if not init_text:
        raise ValueError("prefix.init=text needs prefix.init_text: a string, or @path to a UTF-8 file")
    if init_text.startswith("@"):
        path = Path(init_text[1:]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prefix.init_text={init_text}: no such file")
        try:
            init_text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prefix.init_text={init_text}: not UTF-8 ({err})") from None
    return init_text


def fill(ids: list[int], length: int) -> list[int]:
    """The text's tokens repeated until ``length`` are filled, or its first ``length``: the prefix is then the base's
    keys/values of exactly this token sequence, so the exactness above holds for it."""
    if not ids:
        raise ValueError("prefix.init_text has no tokens; give a text the tokenizer turns into at least one token")
    return (ids * -(-length // len(ids)))[:length]


def text_tokens(init_text: str | None, tokenizer: PreTrainedTokenizerBase, length: int) -> list[int]:
    ids = tokenizer(read_init_text(init_text), add_special_tokens=False)["input_ids"]
    if len(ids) != length:
        how = "repeated to fill" if len(ids) < length else "cut to the first"
        logger.info("prefix.init_text: %d tokens, %s prefix.length=%d", len(ids), how, length)
    return fill(ids, length)


def vocab_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int, length: int, seed: int) -> list[int]:
    """``length`` ids drawn with replacement from the ids below ``vocab_size`` that are no special token."""
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(len(tokenizer), vocab_size)) if i not in special])
    picks = torch.randint(0, len(pool), (length,), generator=torch.Generator().manual_seed(seed))
    return pool[picks].tolist()


@torch.no_grad()
def base_key_values(base: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """The base's keys (rotary applied) and values of ``ids`` at positions ``-n .. -1``, every layer, as prefix table
    rows ``[n, layers * 2 * kv_heads * head_dim]`` in fp32 (the layout of ``PrefixEncoder.embedding``)."""
    device = base.get_input_embeddings().weight.device
    tokens = torch.tensor([ids], device=device)
    positions = torch.arange(-len(ids), 0, device=device)[None]
    was_training = base.training
    base.eval()
    try:
        cache = base(input_ids=tokens, position_ids=positions, use_cache=True).past_key_values
    finally:
        base.train(was_training)
    # per layer [1, kv_heads, n, head_dim] -> [n, layers, 2, kv_heads, head_dim]
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1).float()


def initialise_prefix(
    prefix: PrefixEncoder,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix_cfg: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Set a fresh prefix's table as ``prefix.init`` says; return what a checkpoint records of it (the kind and, for
    text/vocab, the token ids, so the start can be rebuilt without the text file)."""
    kind = prefix_cfg.get("init", "random")
    if kind == "random":
        return {"kind": "random"}
    if kind not in INITS:
        raise ValueError(f"prefix.init={kind!r}: must be one of {', '.join(INITS)}")
    if prefix.trans is not None:
        raise ValueError(f"prefix.init={kind} needs prefix.projection=false: the projection's input is no key/value")
    if kind == "text":
        ids = text_tokens(prefix_cfg.get("init_text"), tokenizer, prefix.length)
    else:
        ids = vocab_tokens(tokenizer, base.config.vocab_size, prefix.length, seed)
    prefix.embedding.weight.data.copy_(base_key_values(base, ids))
    logger.info("prefix.init=%s: the base's keys/values of %d tokens", kind, len(ids))
    return {"kind": kind, "token_ids": ids}
