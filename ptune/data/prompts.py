"""Prompt formats: how a query and its earlier turns become the text the model is given. All formats live here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# The ChatGLM2-6B format (its tokenizer's `build_prompt`): earlier rounds, then the open round ending in "答：".
CHATGLM2_TURN = "[Round {index}]\n\n问：{query}\n\n答：{response}\n\n"
CHATGLM2_QUERY = "[Round {index}]\n\n问：{query}\n\n答："


@dataclass(frozen=True)
class PromptFormat:
    """``kind`` is ``template`` (``turn``/``query`` strings with ``{index}``, ``{query}``, ``{response}``) or
    ``chat_template`` (the tokenizer's own chat template). ``chatglm2`` is the template preset above."""

    kind: str = "chatglm2"
    turn: str = CHATGLM2_TURN
    query: str = CHATGLM2_QUERY

    @classmethod
    def from_config(cls, cfg) -> PromptFormat:
        kind = cfg["kind"]
        if kind == "chatglm2":
            return cls()
        if kind == "chat_template":
            return cls(kind=kind, turn="", query="")
        if kind == "template":
            return cls(kind=kind, turn=cfg["turn"], query=cfg["query"])
        raise ValueError(f"model.prompt.kind={kind!r} is not a prompt format; use chatglm2, chat_template or template")

    @property
    def text_has_special_tokens(self) -> bool:
        """A chat template writes the special tokens into the text; templates rely on the tokenizer adding them."""
        return self.kind == "chat_template"

    def build(
        self,
        query: str,
        history: Sequence[tuple[str, str]] = (),
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> str:
        """The prompt for ``query`` after the earlier ``history`` turns, ready for the answer to follow."""
        if self.kind == "chat_template":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "model.prompt.kind=chat_template needs a tokenizer with a chat template; this one has none. "
                    "Use model.prompt.kind=template with model.prompt.turn/query instead."
                )
            messages = []
            for past_query, past_response in history:
                messages += [
                    {"role": "user", "content": past_query},
                    {"role": "assistant", "content": past_response},
                ]
            messages.append({"role": "user", "content": query})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rounds = [self.turn.format(index=i, query=q, response=r) for i, (q, r) in enumerate(history, start=1)]
        rounds.append(self.query.format(index=len(history) + 1, query=query))
        return "".join(rounds)


def newest_turns_that_fit(
    length: Callable[[Sequence[tuple[str, str]]], int], history: Sequence[tuple[str, str]], limit: int
) -> tuple[list[tuple[str, str]], int]:
    """The newest turns of ``history`` whose prompt (``length(turns)`` tokens, the query included) fits in
    ``limit``, and how many of the oldest were left out; all of them when even the query alone does not fit.

    One rule for training rows and the chat front ends: a conversation keeps its newest turns and the question,
    which a cut at the end of the prompt (the reference's rule for a single prompt) would lose first."""
    turns = list(history)
    for dropped in range(len(turns)):
        if length(turns[dropped:]) <= limit:
            return turns[dropped:], dropped
    return [], len(turns)
