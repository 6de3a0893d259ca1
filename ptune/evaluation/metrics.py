"""Generation metrics exactly as the ChatGLM2-6B P-tuning recipe computes them, only faster.

The reference (``ptuning/main.py``'s ``compute_metrics``) scores every (prediction, label) pair with

* ROUGE-1/2/L F-scores from ``rouge_chinese`` over jieba words (``' '.join(jieba.cut(text))``), and
* sentence BLEU-4 from nltk over characters with ``SmoothingFunction().method3``,

each times 100 and rounded to 4 decimals, then reports the plain mean over rows. We call the very same library
functions with the very same arguments, so every per-row number is bit-identical to the reference; what changes is
only the cost around them:

* jieba's dictionary is loaded once (in the parent), not lazily inside the first scored row of every process;
* one ``Rouge()`` and one ``SmoothingFunction`` serve a whole chunk of rows instead of one row (both are stateless
  between calls, so reuse cannot change a score);
* chunks are scored in worker processes. With a ``fork`` start method the workers inherit the loaded dictionary and
  the input lists from the parent without pickling them; elsewhere (spawn) they get the inputs once each.

Where we deliberately differ from the reference: a row it cannot score at all scores 0 on all four metrics instead
of crashing the whole evaluation. See :func:`_unscorable`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import warnings
from collections.abc import Sequence

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
ROUGE_NAMES = METRIC_NAMES[:3]

# Below this many rows, starting worker processes costs more than it saves (about 3 ms a row serially).
SERIAL_BELOW = 64
# Chunks per worker: a few, so that one slow chunk (long texts) does not leave the other workers idle at the end.
CHUNKS_PER_WORKER = 4
# ... but never chunks so small that dispatching them (and starting a worker per chunk) outweighs scoring them.
MIN_CHUNK = 16

# jieba logs "Building prefix dict from ... / Loading model cost ... / Prefix dict has been built successfully." at
# DEBUG level through its own handler on first use; evaluation logs should not carry that once per process.
jieba.setLogLevel(logging.WARNING)

# nltk warns "The hypothesis contains 0 counts of N-gram overlaps" from its unsmoothed method0 only; method3 (ours)
# does not, but the filter is kept in place around the BLEU calls so a future nltk cannot flood evaluation logs.
_NLTK_ZERO_COUNTS = r"\s*The hypothesis contains 0 counts of"


def _ensure_jieba() -> None:
    """Load jieba's prefix dictionary now (about a second), once per process, instead of inside the first row."""
    if not jieba.dt.initialized:
        jieba.initialize()


def _zeros() -> dict[str, float]:
    return dict.fromkeys(METRIC_NAMES, 0.0)


def _unscorable(prediction: str, label: str) -> bool:
    """Whether the reference would crash on this pair (we then score 0 on all four metrics).

    ``Rouge.get_scores`` splits the jieba-joined text into sentences after ``rstrip()`` and drops empty ones, and
    raises ``ValueError("Hypothesis is empty.")`` / ``ValueError("Reference is empty.")`` when none is left. jieba
    keeps every character, so that happens exactly when the raw text is empty or whitespace-only in ``str.isspace``'s
    sense, i.e. ``not text.strip()``: "", " ", "\\n", "\\t \\r\\n", but also U+3000 (ideographic space), U+00A0
    (no-break space), U+0085, U+2028/U+2029, U+001C..U+001F and the other Unicode spaces. Found by experiment
    (tests/evaluation/test_metrics.py checks it both ways, and a 20,000-pair random fuzz over whitespace,
    punctuation, "……",
    "?", latin, CJK, U+200B, U+FEFF and NUL agreed): punctuation-only text ("。", "！！", "...", "?"), U+200B
    (zero-width space, not a space to Python), U+FEFF and NUL do not raise and are scored normally. This is
    checked up front rather than by catching ``ValueError`` so that any other failure still surfaces.
    nltk's BLEU never raises here: with no unigram match (empty prediction or label included) it returns 0.
    """
    return not prediction.strip() or not label.strip()


def _score_with(prediction: str, label: str, rouge: Rouge, smoothing: SmoothingFunction) -> dict[str, float]:
    """One row, reference semantics, with a caller-owned ``Rouge`` and ``SmoothingFunction`` (both stateless)."""
    if _unscorable(prediction, label):
        return _zeros()
    hypothesis = " ".join(jieba.cut(prediction))
    reference = " ".join(jieba.cut(label))
    scores = rouge.get_scores(hypothesis, reference)[0]
    row = {name: round(scores[name]["f"] * 100, 4) for name in ROUGE_NAMES}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=smoothing.method3)
    # sentence_bleu returns the int 0 when nothing matches; float() keeps the value and makes the type uniform.
    row["bleu-4"] = float(round(bleu * 100, 4))
    return row


def _score_chunk(predictions: Sequence[str], labels: Sequence[str]) -> list[dict[str, float]]:
    """Score rows in order, with one ``Rouge`` and one ``SmoothingFunction`` for the whole chunk."""
    _ensure_jieba()
    rouge = Rouge()
    smoothing = SmoothingFunction()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NLTK_ZERO_COUNTS, category=UserWarning)
        return [_score_with(pred, label, rouge, smoothing) for pred, label in zip(predictions, labels, strict=True)]


def score_pair(prediction: str, label: str) -> dict[str, float]:
    """One row's ``rouge-1``, ``rouge-2``, ``rouge-l`` and ``bleu-4``, identical to the reference recipe's numbers.

    A pair the reference crashes on (empty or whitespace-only prediction or label) scores 0 on all four.
    """
    return _score_chunk([prediction], [label])[0]


# The inputs of the score_pairs call being served, per worker process (set by the pool initializer).
_WORKER_INPUTS: tuple[list[str], list[str]] | None = None


def _init_worker(predictions: list[str], labels: list[str]) -> None:
    """Pool initializer: keep the inputs in the worker, so tasks only carry (start, stop) index pairs.

    With ``fork`` the arguments are inherited, not pickled, and so is the parent's loaded jieba dictionary; with
    ``spawn`` they are pickled once per worker and the dictionary is loaded here.
    """
    global _WORKER_INPUTS
    _WORKER_INPUTS = (predictions, labels)
    _ensure_jieba()


def _score_range(bounds: tuple[int, int]) -> list[dict[str, float]]:
    start, stop = bounds
    assert _WORKER_INPUTS is not None, "_score_range runs only in a pool started by score_pairs"
    predictions, labels = _WORKER_INPUTS
    return _score_chunk(predictions[start:stop], labels[start:stop])


def _pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` where the platform has it (workers inherit jieba and the inputs for free), else the default."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def score_pairs(
    predictions: Sequence[str], labels: Sequence[str], processes: int | None = None
) -> list[dict[str, float]]:
    """``[score_pair(p, l) for p, l in zip(predictions, labels)]``, in order, computed over worker processes.

    ``processes`` defaults to ``os.cpu_count()``. Small inputs (fewer than ``SERIAL_BELOW`` rows) and
    ``processes == 1`` run serially in this process, where a pool would cost more than it saves. jieba's
    dictionary is loaded here before any worker starts, so forked workers share it instead of each loading it.
    Forking is safe from a process holding a model (even on a GPU): the workers never touch it, and its memory
    is shared copy-on-write, not copied.
    """
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels: they must pair up one to one")
    if processes is None:
        processes = os.cpu_count() or 1
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    _ensure_jieba()
    rows = len(predictions)
    if processes == 1 or rows < SERIAL_BELOW:
        return _score_chunk(predictions, labels)

    chunk = max(MIN_CHUNK, math.ceil(rows / (processes * CHUNKS_PER_WORKER)))
    bounds = [(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]
    pool = _pool_context().Pool(min(processes, len(bounds)), initializer=_init_worker, initargs=(predictions, labels))
    try:
        chunks = pool.map(_score_range, bounds, chunksize=1)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return [row for scored in chunks for row in scored]


def summarize(predictions: Sequence[str], per_row: Sequence[dict[str, float]]) -> dict[str, float]:
    """The reference's report (plain mean of each metric over rows) plus a few numbers that explain it.

    ``rows``: how many pairs were scored; ``empty_prediction_share``: the share of predictions that are empty after
    ``strip()`` (they score 0, so a high share explains low metrics); ``mean_prediction_length``: mean ``len()`` in
    characters (runaway or truncated generations show up here first). With no rows every mean is NaN, as
    ``np.mean`` of nothing would be (without its warning).
    """
    rows = len(per_row)
    if len(predictions) != rows:
        raise ValueError(f"{len(predictions)} predictions but {rows} scored rows: they must pair up one to one")
    if rows == 0:
        summary = dict.fromkeys(METRIC_NAMES, math.nan)
        summary.update(rows=0, empty_prediction_share=math.nan, mean_prediction_length=math.nan)
        return summary
    summary = {name: float(np.mean([row[name] for row in per_row])) for name in METRIC_NAMES}
    summary["rows"] = rows
    summary["empty_prediction_share"] = sum(1 for p in predictions if not p.strip()) / rows
    summary["mean_prediction_length"] = float(np.mean([len(p) for p in predictions]))
    return summary


def compute_metrics(
    predictions: Sequence[str], labels: Sequence[str], processes: int | None = None
) -> dict[str, float]:
    """:func:`score_pairs` then :func:`summarize`: the reference's four means plus ``rows``,
    ``empty_prediction_share`` and ``mean_prediction_length``."""
    predictions = list(predictions)
    return summarize(predictions, score_pairs(predictions, labels, processes=processes))
