"""The text of a growing answer, for streaming it (the chat front ends, ``ptune serve``'s streaming rows)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class TextSoFar:
    """The text of a growing answer for streaming, at a cost per new token that does not grow with the answer.

    Decoding all of an answer's ids at every step would cost O(length) a token (O(length^2) an answer). Instead
    each update decodes a short window, the tokens since the last update plus those of the update before (their
    context), with and without the new tokens, and appends the difference: a tokenizer that drops the space of a
    window's first word piece drops it from both, so the difference is what the whole decode adds. While the
    newest token ends in an incomplete character (a byte token that only the next one completes decodes to
    U+FFFD) nothing is appended. ``shown`` is the text so far stripped as ``decode`` strips it, so it grows into
    the final ``decode`` of the ids (a tokenizer whose clean-up joins across the window's edge may differ there;
    the final answer always comes from the ids)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> None:
        self.tokenizer, self.ids = tokenizer, ids  # ``ids`` is the row's list, which grows as it decodes
        self._text, self._start, self._read = "", 0, 0
        self.shown = ""

    def update(self) -> str:
        if len(self.ids) > self._read:
            before = self._decode(self.ids[self._start : self._read])
            after = self._decode(self.ids[self._start :])
            if not after.endswith("\ufffd"):
                if after.startswith(before):
                    self._text += after[len(before) :]
                else:  # the new tokens changed the window's earlier text: decode it all this once
                    self._text = self._decode(self.ids)
                self._start, self._read = self._read, len(self.ids)
                self.shown = self._text.strip()
        return self.shown

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
