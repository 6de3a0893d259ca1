"""The one generation path: prompts in, answers out, for the evaluator and every demo.

One step-wise batched decoder (``BatchDecoder``) does all the decoding: the evaluator fills a batch and runs it
to the end (``generate_ids``), the chat front ends run one row (``stream_answer``), the API server's scheduler
lets rows join and leave between steps (``ptune.serve.scheduler``). A step packs every row's tokens into one
sequence (no padding) and each row keeps its own positions, so a row gets the same tokens batched as alone; the
evaluator takes rows longest prompt first (results in input order). Greedy by default, so metrics are
reproducible; a sampled row draws from its own generator seeded with its seed, so its answer does not depend on
what it was batched with.

Why our own loop rather than ``generate``: ``generate`` runs a fixed batch to its end (a row cannot join or
leave), takes one set of sampling settings for the whole batch, and the prefix would be recomputed and copied in
front of the cache on every step. The token choice itself uses transformers' logits processors.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ptune.data.prompts import newest_turns_that_fit
from ptune.data.reading import Example
from ptune.inference.loading import LoadedModel
from ptune.inference.slots import SlotCache
from ptune.inference.streaming import TextSoFar
from ptune.model.prefix import ATTN_IMPLEMENTATION, PrefixShape, PrefixTunedModel

GENERATE_DEFAULT_TOP_K = 50  # what ``generate`` samples with when the model's generation config sets no top_k


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    # with max_length: the row's prompt and answer together at most this many tokens (the reference ``main.py``'s
    # budget, ``max_source_length + max_target_length + 1``), so a short prompt leaves room for a longer answer
    max_length: int | None = None
    do_sample: bool = False  # greedy: the same answers (and metrics) on every run
    top_p: float = 0.7  # with do_sample: the reference recipe's values
    temperature: float = 0.95
    seed: int = 42  # with do_sample: seeds the row's own random generator (its answer depends on it alone)


def eos_ids(loaded: LoadedModel) -> list[int]:
    """End-of-answer ids: the tokenizer's eos plus any the model's generation config adds. A missing or foreign eos
    would make every answer run to max_new_tokens, so it is checked here rather than discovered in the metrics."""
    tokenizer, config = loaded.tokenizer, loaded.model.config
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{loaded.base_path}: the tokenizer has no eos token; set eos_token in tokenizer_config.json")
    extra = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None) or []
    ids = list(dict.fromkeys([tokenizer.eos_token_id, *([extra] if isinstance(extra, int) else extra)]))
    too_large = [i for i in ids if i >= config.vocab_size]
    if too_large:
        raise ValueError(f"{loaded.base_path}: eos id(s) {too_large} are outside the vocabulary ({config.vocab_size})")
    return ids


def encode_prompt(
    loaded: LoadedModel, query: str, history: Sequence[tuple[str, str]] = (), truncate: bool = True
) -> list[int]:
    """Prompt ids as in training: the prompt format, special prefix tokens, truncated to max_source_length (at the
    end, as the reference recipe does; ``fit_history`` keeps a conversation's newest turns instead)."""
    text = loaded.prompt_format.build(query, history, loaded.tokenizer)
    return loaded.tokenizer(
        text,
        add_special_tokens=not loaded.prompt_format.text_has_special_tokens,
        truncation=truncate,
        max_length=loaded.max_source_length if truncate else None,
    )["input_ids"]


def fit_history(
    loaded: LoadedModel, query: str, history: Sequence[tuple[str, str]]
) -> tuple[list[tuple[str, str]], int]:
    """The newest turns of ``history`` that fit in max_source_length with ``query``, and how many of the oldest
    were left out (the chat front ends say so). The query itself is never dropped; alone too long, it is cut as
    in training."""
    return newest_turns_that_fit(
        lambda turns: len(encode_prompt(loaded, query, turns, truncate=False)), history, loaded.max_source_length
    )


def query_is_cut(loaded: LoadedModel, query: str) -> bool:
    """Whether ``query`` alone is longer than max_source_length, so that its end is cut (the chat front ends say so)."""
    return len(encode_prompt(loaded, query, truncate=False)) > loaded.max_source_length


def reference_label(tokenizer: PreTrainedTokenizerBase, response: str, max_target_length: int) -> str:
    """The label text the reference recipe scores against: the answer tokenised (with special tokens, truncated to
    max_target_length) and decoded without them."""
    ids = tokenizer(response, truncation=True, max_length=max_target_length)["input_ids"]
    return decode(tokenizer, ids)


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Answer text as the reference scores it: special tokens dropped, no clean-up of spaces (the reference's
    metrics decode without it; asking for it only makes transformers 5 warn that BPE tokenizers ignore it)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _token_chooser(settings: GenerationSettings, top_k: int | None) -> LogitsProcessorList | None:
    """A sampled row's logits processors, as ``generate`` builds them (temperature, the model's top_k, top_p);
    None for a greedy row."""
    if not settings.do_sample:
        return None
    chain = LogitsProcessorList()
    if settings.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(settings.temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if settings.top_p < 1.0:
        chain.append(TopPLogitsWarper(settings.top_p))
    return chain


@dataclass(eq=False)
class Row:
    """One prompt being answered: its settings, the answer so far, and why it ended (None while it goes on)."""

    prompt: list[int]
    settings: GenerationSettings
    chooser: LogitsProcessorList | None
    generator: torch.Generator | None  # a sampled row's own random stream: its answer depends on its seed only
    prefix: torch.Tensor | None = None  # its prefix keys/values, [layers, 2, heads, length, dim]; None: the bare base
    ids: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in its cache so far; all of them once it decodes
    finish: str | None = None  # "stop" (an end token), "length" (max_new_tokens reached) or "error" (see error)
    error: Exception | None = None  # why this row alone could not go on (its batch-mates are not touched)


class BatchDecoder:
    """Step-wise batched decoding with rows that join and leave between steps (continuous batching).

    ``join`` gives new rows free slots of the batch's cache (their prefixes copied in; ``new_row`` first makes a
    row, so a row whose settings fail fails alone), ``step`` runs one forward for the whole batch: the next token
    of every decoding row and, packed in the same pass, the prompts (or the next chunks of them, under
    ``step_tokens``) of rows that joined, whose first answer token is chosen when their prompt is in; ``add`` joins
    and steps once (whole prompts: their first tokens); ``remove`` takes rows out (finished, or their client gone)
    and frees their slots. A row whose token cannot be chosen (its sampling settings give no distribution) ends with
    ``finish == "error"`` and its ``error``; the others go on. Each row keeps its own positions (0 at its first
    prompt token), so a row's tokens are those it would get alone. With a prefix, its keys/values are computed once
    (``PrefixTunedModel.inference_prefix``) and sit at the front of the row's cache slot instead of being
    recomputed and concatenated at every step of every layer. The cache and the packed step are
    ``ptune.inference.slots``'s (layout, memory); ``slots`` and ``length`` size the cache at once (``ptune serve``:
    max_batch_size, and the longest prompt plus max_new_tokens_limit); without them it fits the first rows that
    join and grows when a join needs more.

    Why a join costs no forward of its own: a decode step of a few rows reads all the model's weights to compute
    a handful of tokens, so the joining prompt's tokens ride along almost for free, and the batch does not wait a
    whole extra forward (on a small model, mostly Python's dispatch) for each arrival. ``step_tokens`` bounds a
    step's tokens, so a long prompt arriving delays the running rows' next token by a bounded amount: it is
    prefilled in chunks over several steps. None (the evaluator, the chat front ends): a whole prompt at once.

    Rows may carry different prefixes (several checkpoints of one base, ``ptune serve checkpoint=A,B``) or none
    (the bare base): ``new_row(..., prefix=...)``. The prefix region is then as wide as the longest prefix given
    (``other_prefixes``); a row's own prefix fills its first columns and the mask hides the rest, so each row
    attends to its own prefix only. Prefix keys carry no position, so where they sit does not change an answer.

    Not thread-safe: one thread owns a decoder (and the model) at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        other_prefixes: Sequence[torch.Tensor] = (),
        slots: int | None = None,
        length: int | None = None,
        step_tokens: int | None = None,
    ) -> None:
        if step_tokens is not None and step_tokens < 1:
            raise ValueError(f"step_tokens must be at least 1 (or None: no limit), got {step_tokens}")
        self.loaded, self.model, self.step_tokens = loaded, loaded.model, step_tokens
        self.stops = eos_ids(loaded)
        self._stop_set = set(self.stops)
        self.device = next(self.model.parameters()).device
        configured = getattr(getattr(getattr(self.model, "base", self.model), "generation_config", None), "top_k", None)
        self.top_k = GENERATE_DEFAULT_TOP_K if configured is None else configured
        self.vocab_size = self.model.config.vocab_size
        self.rows: list[Row] = []  # row k is in the cache's slot k
        base = getattr(self.model, "base", self.model)
        if base.config._attn_implementation != ATTN_IMPLEMENTATION:  # a bare base: plain SDPA plus the step hook
            base.set_attn_implementation(ATTN_IMPLEMENTATION)
        dtype = next(self.model.parameters()).dtype
        if isinstance(self.model, PrefixTunedModel):
            # in the base's dtype once, not at every join
            self._prefix: torch.Tensor | None = self.model.inference_prefix().to(dtype)
            self._forward_context = self.model.prefix_in_cache
        else:
            self._prefix, self._forward_context = None, contextlib.nullcontext
        known = [p for p in (self._prefix, *other_prefixes) if p is not None]
        region = max((p.shape[3] for p in known), default=0)  # the prefix region's width
        self.cache = SlotCache(self.model.config.num_hidden_layers, region, slots, length)
        shape = PrefixShape.from_config(self.model.config)
        self._like = torch.empty(1, shape.num_kv_heads, 1, shape.head_dim, dtype=dtype, device=self.device)
        if slots and length and dtype.is_floating_point:  # allocated now, not by the first request
            self.cache.reserve(self._like, slots, length)

    def add(self, prompts: Sequence[list[int]], settings: Sequence[GenerationSettings]) -> list[Row]:
        """Add ``prompts`` to the batch and step once, which prefills them whole: each has its first answer token
        (or has ended), and any running row its next one. For a decoder without ``step_tokens`` (the evaluator, the
        chat front ends); with it, prompts take several steps: ``join``, then ``step``."""
        if self.step_tokens is not None:
            raise ValueError("add prefills whole prompts in one step; with step_tokens, join and then step")
        rows = self.join([self.new_row(prompt, s) for prompt, s in zip(prompts, settings, strict=True)])
        self.step()
        return rows

    def new_row(self, prompt: Sequence[int], settings: GenerationSettings, prefix: torch.Tensor | str = "own") -> Row:
        """A row for ``prompt``, not yet in the batch; its settings or prompt fail here (a seed out of range, an id
        outside the vocabulary), for it alone. ``prefix``: the loaded model's own ("own"), another's keys/values
        (one of ``other_prefixes``), or None."""
        own = isinstance(prefix, str)
        if not own and prefix is not None and prefix.shape[3] > self.cache.region:
            raise ValueError(f"a prefix of {prefix.shape[3]} positions is longer than this decoder's region")
        if not prompt:
            raise ValueError("an empty prompt: there is no token to answer after")
        outside = [i for i in prompt if not 0 <= i < self.vocab_size]
        if outside:
            raise ValueError(f"prompt token id(s) {outside[:5]} are outside the vocabulary ({self.vocab_size})")
        generator = torch.Generator(self.device).manual_seed(settings.seed) if settings.do_sample else None
        chooser = _token_chooser(settings, self.top_k)
        return Row(list(prompt), settings, chooser, generator, self._prefix if own else prefix)

    def join(self, rows: list[Row]) -> list[Row]:
        """Give ``rows`` free cache slots (their prefixes copied in); the next steps prefill their prompts."""
        longest = max(len(r.prompt) + r.settings.max_new_tokens for r in rows)
        self.cache.open([r.prefix for r in rows], self._like, longest)
        self.rows = self.rows + rows
        return rows

    @torch.inference_mode()
    def step(self) -> None:
        """One forward: a new token for every decoding row, the next prompt chunk of every prefilling row (under
        ``step_tokens``), the first token of each whose prompt is then in (finished rows must be removed first)."""
        if any(r.finish for r in self.rows):
            raise ValueError("remove finished rows before the next step")
        decoding = [k for k, r in enumerate(self.rows) if r.prefilled == len(r.prompt)]
        budget = math.inf if self.step_tokens is None else max(self.step_tokens - len(decoding), 1)  # prompt tokens
        chunks, choosing = [], [self.rows[k] for k in decoding]
        tokens = [self.rows[k].ids[-1] for k in decoding]
        for k, row in enumerate(self.rows):
            left = len(row.prompt) - row.prefilled
            if not left or not budget:
                continue
            length = min(left, budget)
            chunks.append((k, length))
            tokens += row.prompt[row.prefilled : row.prefilled + length]
            row.prefilled += length
            budget -= length
        plan = self.cache.plan(decoding, chunks)
        keep = list(range(len(decoding)))  # the positions whose next token is chosen
        for chunk in plan.chunks:
            if self.rows[chunk.slot].prefilled == len(self.rows[chunk.slot].prompt):
                keep.append(chunk.start + chunk.length - 1)
                choosing.append(self.rows[chunk.slot])
        if plan.chunks:  # packed: [1, tokens], the cache's own attention
            chosen = torch.tensor(keep, dtype=torch.long, device=self.device)
            ids = torch.tensor([tokens], device=self.device)
            unused_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)  # stops transformers making one
            logits = self._forward(ids, unused_mask, plan.positions, chosen, ptune_attention=self.cache.attend)[0]
        else:  # every row decodes: a plain batch, one token a row
            ids = torch.tensor(tokens, device=self.device)[:, None]
            logits = self._forward(ids, plan.mask, plan.positions, 1)[:, -1]
        self._choose(choosing, logits)

    @torch.inference_mode()
    def remove(self, rows: Sequence[Row]) -> None:
        """Take ``rows`` out of the batch and free their cache slots."""
        gone = {id(r) for r in rows}
        slots = [k for k, r in enumerate(self.rows) if id(r) in gone]
        if slots:
            order = self.cache.free(slots)
            self.rows = [self.rows[k] for k in order]

    def _forward(self, ids, mask, positions, keep: torch.Tensor | int, **attention) -> torch.Tensor:
        """A step's forward over the cache: the float32 logits of the positions ``keep``."""
        with self._forward_context():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                logits_to_keep=keep,
                **attention,
            )
        return out.logits.to(dtype=torch.float32)

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()
        for k, row in enumerate(rows):
            token = greedy[k]
            if row.chooser is not None:
                try:
                    scores = row.chooser(None, logits[k : k + 1])
                    token = int(torch.multinomial(scores.softmax(dim=-1), 1, generator=row.generator))
                except RuntimeError as err:  # e.g. inf/nan probabilities: this row's settings, not the batch's
                    row.finish, row.error = "error", err
                    continue
            if token in self._stop_set:
                row.finish = "stop"
                continue
            row.ids.append(token)
            if len(row.ids) >= row.settings.max_new_tokens:
                row.finish = "length"


def row_settings(settings: GenerationSettings, prompt: Sequence[int]) -> GenerationSettings:
    """A row's own settings: with ``max_length``, its answer budget is what its prompt leaves (at least one token)."""
    if settings.max_length is None:
        return settings
    return replace(settings, max_new_tokens=max(1, settings.max_length - len(prompt)), max_length=None)


def generate_ids(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    settings: GenerationSettings,
    batch_size: int,
    stop: threading.Event | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(index, answer ids without eos)`` for each prompt as it finishes, a batch at a time, longest prompts
    first. ``stop`` ends generation when set (the rows so far are yielded as they are)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    decoder = BatchDecoder(loaded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = decoder.add([prompts[i] for i in batch], [row_settings(settings, prompts[i]) for i in batch])
        index = {id(row): i for row, i in zip(rows, batch, strict=True)}
        while decoder.rows:
            ended = [r for r in decoder.rows if r.finish or (stop is not None and stop.is_set())]
            decoder.remove(ended)
            for row in ended:
                if row.error is not None:
                    raise row.error
                yield index[id(row)], row.ids
            if decoder.rows:
                decoder.step()


def generate_answers(
    loaded: LoadedModel, examples: Sequence[Example], settings: GenerationSettings, batch_size: int
) -> list[str]:
    """Decoded answers for ``examples``, in their order."""
    prompts = [encode_prompt(loaded, ex.prompt, ex.history) for ex in examples]
    answers = [""] * len(prompts)
    for index, ids in generate_ids(loaded, prompts, settings, batch_size):
        answers[index] = decode(loaded.tokenizer, ids)
    return answers


def stream_answer(
    loaded: LoadedModel,
    query: str,
    history: Sequence[tuple[str, str]],
    settings: GenerationSettings,
    stop: threading.Event | None = None,
    answer_ids: list[int] | None = None,
) -> Iterator[str]:
    """Yield the answer as it grows (the whole text so far), for chat front ends. Same path as the evaluator:
    the same prompt ids and decoder, so the finished answer equals the evaluator's for the same settings.
    ``answer_ids``, if given, receives the answer's token ids once it is complete (for exact token counts).

    ``history`` should fit (``fit_history``): prompts are cut at the end, as in training. Generation runs in the
    caller's thread, a token per iteration: closing the iterator early (a client gone) or
    an exception in it (Ctrl-C) stops it at once, and ``stop`` ends it at the next token."""
    decoder = BatchDecoder(loaded)
    prompt = encode_prompt(loaded, query, history)
    [row] = decoder.add([prompt], [row_settings(settings, prompt)])
    text = TextSoFar(loaded.tokenizer, row.ids)
    while True:
        sent = text.shown
        if text.update() != sent:
            yield text.shown
        if row.error is not None:
            raise row.error
        if row.finish or (stop is not None and stop.is_set()):
            break
        decoder.step()
    if answer_ids is not None:
        answer_ids.extend(row.ids)
    final = decode(loaded.tokenizer, row.ids)
    if final != text.shown:  # a held-back incomplete character at the very end; the ids decide
        yield final
