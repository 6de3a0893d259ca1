"""Sequence packing for training: several rows per sequence, each row attending only to itself and the prefix.

A micro-batch of rows is packed, first fit by decreasing length, into sequences of exactly ``pack_length`` tokens
(longer if one row is longer). Each row keeps its own positions 0, 1, 2, ... and its labels; the rest of a sequence
is padding whose positions also restart at 0. No attention mask is passed: transformers then finds the packed rows
from the restarting ``position_ids`` and builds the block-diagonal causal mask itself (``masking_utils``'s
packed-sequence format), and ptune's attention hook puts the prefix columns, visible to every row, in front of
it. So a packed row computes what it computes alone, with no padding to the longest row of the micro-batch, and the
shapes stay few (``rows x pack_length`` for a handful of row counts), which on CPU keeps oneDNN's per-shape
kernel caches from growing resident memory as exact lengths otherwise do.

Why our own collator rather than transformers' ``DataCollatorWithFlattening``: that one flattens a whole
micro-batch into one sequence, so with an SDPA mask every token would attend over (and pay for) all the others;
bins of a fixed length bound that waste and the number of shapes.

The first token of each row gets label -100: it is never predicted in an unpacked row either (position t predicts
token t + 1), and packed it would be predicted from the previous row's last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ptune.data.features import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Indices of the rows in each packed sequence: first fit by decreasing length into bins of ``pack_length``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        for b, left in enumerate(room):
            if length <= left:
                bins[b].append(index)
                room[b] -= length
                break
        else:
            bins.append([index])
            room.append(pack_length - length)  # negative for a row longer than pack_length: it stays alone
    return [sorted(b) for b in bins]  # rows in their original order inside a sequence


class PackingCollator:
    """Collates rows of ``input_ids`` and ``labels`` into packed sequences with per-row ``position_ids``."""

    def __init__(self, pack_length: int, pad_token_id: int) -> None:
        if pack_length < 1:
            raise ValueError(f"dataset.pack_length must be at least 1 (or null: no packing), got {pack_length}")
        self.pack_length = pack_length
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        bins = pack_rows([len(ids) for ids, _ in rows], self.pack_length)
        width = max(self.pack_length, max(len(ids) for ids, _ in rows))
        input_ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        for b, members in enumerate(bins):
            start = 0
            for index in members:
                ids, row_labels = rows[index]
                end = start + len(ids)
                input_ids[b, start:end] = torch.tensor(ids)
                labels[b, start:end] = torch.tensor(row_labels)
                labels[b, start] = IGNORE_INDEX
                positions[b, start:end] = torch.arange(len(ids))
                start = end
            positions[b, start:] = torch.arange(width - start)  # the padding: one more "row", never labelled
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
