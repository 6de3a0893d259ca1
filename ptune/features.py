"""Examples -> token ids and labels, as the reference ChatGLM2 P-tuning recipe lays them out; cached on disk.

Layout of one training row (reference ``preprocess_function_train``):
    input_ids = prompt ids (with the tokenizer's special prefix, e.g. ``[gMASK] sop``, truncated to
                max_source_length) + answer ids (no special tokens, truncated to max_target_length) + eos
    labels    = -100 over the prompt, then the answer ids + eos
Padding is left to the collator (dynamic, to the longest row of a batch), not to a fixed length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ptune.data import Example
from ptune.prompts import PromptFormat

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when the layout above changes, so stale caches are not reused.
CACHE_VERSION = 1


def encode_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, list[list[int]]]:
    """Token ids and labels for each example, in order (batched through the fast tokenizer)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set eos_token in its tokenizer_config.json")
    prompts = [prompt_format.build(ex.prompt, ex.history, tokenizer) for ex in examples]
    prompt_ids = tokenizer(
        prompts,
        add_special_tokens=not prompt_format.text_has_special_tokens,
        truncation=True,
        max_length=max_source_length,
    )["input_ids"]
    answer_ids = tokenizer(
        [ex.response for ex in examples],
        add_special_tokens=False,
        truncation=True,
        max_length=max_target_length,
    )["input_ids"]
    eos = [tokenizer.eos_token_id]
    return {
        "input_ids": [p + a + eos for p, a in zip(prompt_ids, answer_ids, strict=True)],
        "labels": [[IGNORE_INDEX] * len(p) + a + eos for p, a in zip(prompt_ids, answer_ids, strict=True)],
    }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids: the vocabulary, the special tokens and the backend's full definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(getattr(tokenizer, "chat_template", None)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenize_file(
    path: str | os.PathLike,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_source_length: int,
    max_target_length: int,
    cache_dir: str | os.PathLike | None,
) -> datasets.Dataset:
    """Tokenise the examples read from ``path``, reusing a cached result for the same file, tokenizer and layout.

    The cache key is ours rather than ``datasets``' fingerprint: hashing a tokenizer object by pickling it is not
    stable across processes, which would silently defeat the cache.
    """
    key = hashlib.sha256(
        json.dumps(
            [
                CACHE_VERSION,
                file_sha256(path),
                len(examples),
                tokenizer_fingerprint(tokenizer),
                prompt_format.kind,
                prompt_format.turn,
                prompt_format.query,
                max_source_length,
                max_target_length,
            ]
        ).encode()
    ).hexdigest()[:24]
    cached = Path(cache_dir, key).expanduser() if cache_dir else None
    if cached is not None and (cached / "dataset_info.json").exists():
        logger.info("tokenised %s: reusing cache %s", path, cached)
        return datasets.load_from_disk(str(cached))
    features = encode_examples(examples, tokenizer, prompt_format, max_source_length, max_target_length)
    dataset = datasets.Dataset.from_dict(features)
    if cached is not None:
        # save_to_disk writes into a fresh folder; rename it into place so a crash never leaves half a cache.
        staging = cached.with_name(f".{key}.{os.getpid()}.tmp")
        dataset.save_to_disk(str(staging))
        try:
            os.replace(staging, cached)
        except OSError:  # another process (e.g. another torchrun rank) cached the same data first
            if not (cached / "dataset_info.json").exists():
                raise
            shutil.rmtree(staging)
        dataset = datasets.load_from_disk(str(cached))
        logger.info("tokenised %s: %d rows, cached in %s", path, len(dataset), cached)
    return dataset


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None) -> DataCollatorForSeq2Seq:
    """Dynamic padding on the right (training rows start at position 0); labels padded with -100."""
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="longest",
        label_pad_token_id=IGNORE_INDEX,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )
