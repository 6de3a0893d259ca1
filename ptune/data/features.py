"""Examples -> token ids and labels, as the reference ChatGLM2 P-tuning recipe lays them out; cached on disk.

Layout of one training row (reference ``preprocess_function_train``):
    input_ids = prompt ids (with the tokenizer's special prefix, e.g. ``[gMASK] sop``, truncated to
                max_source_length) + answer ids (no special tokens, truncated to max_target_length) + eos
A row with a history that does not fit leaves out its oldest turns first, as the chat front ends do (the reference
cuts every prompt at the end, which for a conversation cuts the question first); only a prompt still too long
without any earlier turn is cut at the end.
    labels    = -100 over the prompt, then the answer ids + eos
Padding is left to the collator (dynamic, to the longest row of a batch), not to a fixed length.

Every split is checked as it is tokenised (fresh or from the cache): the share of ``<unk>`` tokens and the number of
prompts and answers cut by the length limits are logged (a warning above 1%), and a split in which no row has a
label is refused, as is ``max_target_length`` 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ptune.data.prompts import PromptFormat, newest_turns_that_fit
from ptune.data.reading import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when the layout above (or the cache folder's content) changes, so stale caches are not reused.
CACHE_VERSION = 3
STATS_FILE = "ptune_stats.json"  # TokenStats of the cached rows, next to the dataset files
WARN_SHARE = 0.01  # warn when more than 1% of the tokens are <unk> or of the rows were cut


@dataclass(frozen=True)
class TokenStats:
    """What tokenisation did to a split: counts of tokens, ``<unk>`` tokens and rows cut by the length limits."""

    rows: int
    prompt_tokens: int
    answer_tokens: int
    prompt_unk: int
    answer_unk: int
    prompts_truncated: int
    answers_truncated: int
    labelled_tokens: int  # label positions that are not -100, over all rows
    history_rows_shortened: int = 0  # rows with a history whose oldest turns were left out to fit max_source_length
    history_turns_dropped: int = 0  # the turns left out, over all rows


def _truncated(encoding, max_length: int, tokenizer, texts: list[str], add_special_tokens: bool) -> list[bool]:
    """Which texts the tokenizer cut: the fast tokenizer records the cut tokens; a slow one is asked again."""
    if encoding.encodings is not None:
        return [bool(e.overflowing) for e in encoding.encodings]
    full = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [len(ids) > max_length for ids in full]


def _encode(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_source_length: int,
    max_target_length: int,
) -> tuple[dict[str, list[list[int]]], TokenStats]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set eos_token in its tokenizer_config.json")
    if max_target_length < 1:
        raise ValueError(
            f"dataset.max_target_length={max_target_length}: no answer token would be kept, so there is nothing to "
            "learn but eos; set it to at least 1 (the reference recipe uses 128)"
        )
    special = not prompt_format.text_has_special_tokens
    histories = [_fitting_history(ex, tokenizer, prompt_format, max_source_length, special) for ex in examples]
    prompts = [
        prompt_format.build(ex.prompt, turns, tokenizer) for ex, (turns, _) in zip(examples, histories, strict=True)
    ]
    answers = [ex.response for ex in examples]
    prompt_enc = tokenizer(prompts, add_special_tokens=special, truncation=True, max_length=max_source_length)
    answer_enc = tokenizer(answers, add_special_tokens=False, truncation=True, max_length=max_target_length)
    prompt_ids, answer_ids = prompt_enc["input_ids"], answer_enc["input_ids"]
    eos = [tokenizer.eos_token_id]
    unk = tokenizer.unk_token_id
    features = {
        "input_ids": [p + a + eos for p, a in zip(prompt_ids, answer_ids, strict=True)],
        "labels": [[IGNORE_INDEX] * len(p) + a + eos for p, a in zip(prompt_ids, answer_ids, strict=True)],
    }
    stats = TokenStats(
        rows=len(examples),
        prompt_tokens=sum(map(len, prompt_ids)),
        answer_tokens=sum(map(len, answer_ids)),
        prompt_unk=0 if unk is None else sum(ids.count(unk) for ids in prompt_ids),
        answer_unk=0 if unk is None else sum(ids.count(unk) for ids in answer_ids),
        prompts_truncated=sum(_truncated(prompt_enc, max_source_length, tokenizer, prompts, special)),
        answers_truncated=sum(_truncated(answer_enc, max_target_length, tokenizer, answers, False)),
        labelled_tokens=sum(len(labels) - labels.count(IGNORE_INDEX) for labels in features["labels"]),
        history_rows_shortened=sum(1 for _, dropped in histories if dropped),
        history_turns_dropped=sum(dropped for _, dropped in histories),
    )
    return features, stats


def _fitting_history(
    example: Example, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat, limit: int, special: bool
) -> tuple[list[tuple[str, str]], int]:
    """The newest turns of the row's history that fit in ``limit`` tokens with its question, and how many were left
    out (``newest_turns_that_fit``; a row without a history is not tokenised here)."""
    if not example.history:
        return [], 0

    def length(turns) -> int:
        text = prompt_format.build(example.prompt, turns, tokenizer)
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    return newest_turns_that_fit(length, example.history, limit)


def encode_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, list[list[int]]]:
    """Token ids and labels for each example, in order (batched through the fast tokenizer)."""
    return _encode(examples, tokenizer, prompt_format, max_source_length, max_target_length)[0]


def check_split(path: str | os.PathLike, stats: TokenStats, limits: tuple[int, int]) -> None:
    """Log what tokenisation did to the split; warn on many ``<unk>`` or cut rows; refuse a split with no label."""
    if stats.labelled_tokens == 0:
        raise ValueError(
            f"{path}: every label of the split is masked (-100) ({stats.rows} rows), so there is nothing to learn"
        )
    share = {
        "prompt <unk>": (stats.prompt_unk, stats.prompt_tokens, "tokens", "the tokenizer lacks these characters"),
        "answer <unk>": (stats.answer_unk, stats.answer_tokens, "tokens", "the tokenizer lacks these characters"),
        "prompts cut": (stats.prompts_truncated, stats.rows, "rows", f"at dataset.max_source_length={limits[0]}"),
        "answers cut": (stats.answers_truncated, stats.rows, "rows", f"at dataset.max_target_length={limits[1]}"),
    }
    if stats.history_rows_shortened:
        logger.info(
            "%s: %d of %d rows left out their oldest turns (%d turns in all) to fit dataset.max_source_length=%d; "
            "the question and the newest turns are kept",
            path,
            stats.history_rows_shortened,
            stats.rows,
            stats.history_turns_dropped,
            limits[0],
        )
    logger.info(
        "tokenised %s: %d rows; %s",
        path,
        stats.rows,
        "; ".join(f"{name} {count:,} of {total:,} {unit}" for name, (count, total, unit, _) in share.items()),
    )
    for name, (count, total, unit, why) in share.items():
        if total and count / total > WARN_SHARE:
            logger.warning("%s: %s: %d of %d %s (%.1f%%), %s", path, name, count, total, unit, 100 * count / total, why)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids: the vocabulary, the special tokens and the backend's definition, without its
    truncation and padding state (set by each call and by ``padding_side``: they change no id ptune keeps)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    parts = [
        type(tokenizer).__name__,
        json.dumps(definition, sort_keys=True)
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items())),
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
    """Tokenise the examples read from ``path``, reusing a cached result for the same rows, tokenizer and layout.

    The cache key is ours rather than ``datasets``' fingerprint: hashing a tokenizer object by pickling it is not
    stable across processes, which would silently defeat the cache. It covers the examples themselves (so the
    columns, history column and encoding they were read with), the file, the tokenizer, the prompt format and the
    lengths; the split is checked (:func:`check_split`) whether it is tokenised now or read from the cache.
    """
    key = _cache_key(path, examples, tokenizer, prompt_format, (max_source_length, max_target_length))
    cached = Path(cache_dir, key).expanduser() if cache_dir else None
    if cached is not None:
        remove_stale_staging(cached.parent)
    stats = _cached_stats(cached)
    if stats is not None:
        logger.info("tokenised %s: reusing cache %s", path, cached)
        check_split(path, stats, (max_source_length, max_target_length))
        return datasets.load_from_disk(str(cached))
    features, stats = _encode(examples, tokenizer, prompt_format, max_source_length, max_target_length)
    dataset = datasets.Dataset.from_dict(features)
    check_split(path, stats, (max_source_length, max_target_length))
    if cached is not None:
        # save_to_disk writes into a fresh folder; rename it into place so a crash never leaves half a cache.
        staging = cached.with_name(f".{key}.{os.getpid()}.tmp")
        dataset.save_to_disk(str(staging))
        (staging / STATS_FILE).write_text(json.dumps(dataclasses.asdict(stats)), encoding="utf-8")
        try:
            os.replace(staging, cached)
        except OSError:  # another process (e.g. another torchrun rank) cached the same data first
            if not (cached / "dataset_info.json").exists():
                raise
            shutil.rmtree(staging)
        dataset = datasets.load_from_disk(str(cached))
        logger.info("tokenised %s: %d rows, cached in %s", path, len(dataset), cached)
    return dataset


def _cached_stats(cached: Path | None) -> TokenStats | None:
    """The stats of a complete cache entry, or None (no cache, not there, or written by another ptune version)."""
    if cached is None or not (cached / "dataset_info.json").exists() or not (cached / STATS_FILE).exists():
        return None
    try:
        return TokenStats(**json.loads((cached / STATS_FILE).read_text(encoding="utf-8")))
    except (TypeError, ValueError):
        return None


def _cache_key(path, examples: Sequence[Example], tokenizer, prompt_format: PromptFormat, lengths: tuple) -> str:
    """Hash of everything that changes the tokenised rows."""
    rows = hashlib.sha256()
    for ex in examples:  # what was read: differs when the columns, history column or encoding differ
        rows.update(json.dumps([ex.prompt, ex.response, ex.history], ensure_ascii=False).encode())
    return hashlib.sha256(
        json.dumps(
            [
                CACHE_VERSION,
                file_sha256(path),
                rows.hexdigest(),
                tokenizer_fingerprint(tokenizer),
                dataclasses.asdict(prompt_format),
                *lengths,
            ]
        ).encode()
    ).hexdigest()[:24]


def remove_stale_staging(cache_dir: Path) -> None:
    """Remove ``.KEY.PID.tmp`` folders of cache writes whose process is gone (killed mid-write)."""
    if not cache_dir.is_dir():
        return
    for staging in cache_dir.glob(".*.*.tmp"):
        pid = staging.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            logger.info("removing %s, left by an interrupted cache write (process %s)", staging, pid)
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
