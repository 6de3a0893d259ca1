"""The one generation path: prompts in, answers out, for the evaluator and every demo.

Batched with left padding (the model computes position ids from the attention mask, so a padded row gets the
same tokens as alone), rows sorted by length so each batch carries little padding, results in input order.
Greedy by default, so metrics are reproducible; sampling is an option with a seed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ptune.data import Example
from ptune.loading import LoadedModel


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False  # greedy: the same answers (and metrics) on every run
    top_p: float = 0.7  # with do_sample: the reference recipe's values
    temperature: float = 0.95
    seed: int = 42  # with do_sample: seeds torch before generating

    def generate_kwargs(self) -> dict:
        sampling = {"do_sample": True, "top_p": self.top_p, "temperature": self.temperature}
        return {"max_new_tokens": self.max_new_tokens, **(sampling if self.do_sample else {"do_sample": False})}


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


def encode_prompt(loaded: LoadedModel, query: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Prompt ids as in training: the prompt format, special prefix tokens, truncated to max_source_length."""
    text = loaded.prompt_format.build(query, history, loaded.tokenizer)
    return loaded.tokenizer(
        text,
        add_special_tokens=not loaded.prompt_format.text_has_special_tokens,
        truncation=True,
        max_length=loaded.max_source_length,
    )["input_ids"]


def reference_label(tokenizer: PreTrainedTokenizerBase, response: str, max_target_length: int) -> str:
    """The label text the reference recipe scores against: the answer tokenised (with special tokens, truncated to
    max_target_length) and decoded without them."""
    ids = tokenizer(response, truncation=True, max_length=max_target_length)["input_ids"]
    return decode(tokenizer, ids)


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class _StopWhenSet(StoppingCriteria):
    """Ends generation early when a front end sets the event (Ctrl-C in the chat, a client gone)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_ids(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    settings: GenerationSettings,
    batch_size: int,
    streamer: TextIteratorStreamer | None = None,
    stop: threading.Event | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(index, answer ids without eos)`` for each prompt, a batch at a time, longest prompts first.

    ``streamer`` receives the tokens as they come (one prompt only); ``stop`` ends generation when set."""
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    stops = eos_ids(loaded)
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(loaded.model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = _left_padded([prompts[i] for i in batch], pad_id)
        out = loaded.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pad_token_id=pad_id,
            eos_token_id=stops,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]) if stop is not None else None,
            **settings.generate_kwargs(),
        )
        for row, index in enumerate(batch):
            answer = out[row, ids.shape[1] :].tolist()
            end = next((k for k, t in enumerate(answer) if t in stops), len(answer))
            yield index, answer[:end]


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
    the same prompt ids and ``generate_ids``, so the finished answer equals the evaluator's for the same settings.
    ``answer_ids``, if given, receives the answer's token ids once it is complete (for exact token counts).

    Closing the iterator early (a client gone, Ctrl-C) stops generation and waits for it, so the model is free
    for the next request when this returns."""
    stop = stop or threading.Event()
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, list[int] | BaseException] = {}

    def run() -> None:
        try:
            prompt = encode_prompt(loaded, query, history)
            result["ids"] = next(generate_ids(loaded, [prompt], settings, 1, streamer, stop))[1]
        except BaseException as err:  # re-raised in the caller's thread below
            result["error"] = err
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        text = ""
        for piece in streamer:
            text += piece
            yield text.strip()
    finally:
        if worker.is_alive():
            stop.set()
        worker.join()
    if "error" in result:
        raise result["error"]
    if answer_ids is not None:
        answer_ids.extend(result["ids"])
    final = decode(loaded.tokenizer, result["ids"])
    if final != text.strip():  # the streamer's incremental decoding can differ at the very end; the ids decide
        yield final
