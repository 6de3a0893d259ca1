"""The per-slot KV cache of ``BatchDecoder``, and the packed steps that fill it: buffers allocated once per layer
for a number of rows (slots), so a row joins by taking a free slot and leaves by freeing it, and each step's one
forward carries every decoding row's next token *and* the prompt chunks of rows still being prefilled (prefill
inside decode steps, as vLLM V1's token budget does; their scheduler design docs describe it). transformers'
``DynamicCache`` instead concatenates every layer's whole cache at every step, a join had to left-pad and
re-index the whole batch's cache, and each join cost a forward of its own.

Layout, per layer: ``keys`` and ``values`` are ``[slots, kv_heads, region + length, head_dim]``, slot ``k`` holding
the batch's row ``k``. Columns ``0 .. region`` hold the row's prefix keys/values (its own prefix in the first
columns; the rest of the region masked); from ``region`` on, the row's prompt and answer tokens, in order, with no
padding. ``visible`` ``[slots, region + length]`` marks the columns each row attends to (its prefix and its tokens
so far) and ``end`` the row's next free column; the rotary position of its next token is ``end - region`` (0 at
its first prompt token), so a row's answer is the one it gets alone. The slots in use are always ``0 .. used - 1``: a
leaving row's slot receives the last slot's row (a copy of that one row), so a step reads views, never a gather.

A step (``plan``, then the model's forward) in which some rows are prefilling is packed: the tokens of all rows
go into one sequence ``[1, tokens]`` (the decoding rows' tokens first, then each prefilling row's chunk), so the
linear layers see each token once and no row is padded to another's length. The model's attention calls
``update`` (every token's key/value scattered to its row's slot and column, one indexed write per layer) and then
``attend`` (through ``ptune_sdpa``'s ``ptune_attention`` hook, ``ptune.model.prefix``): one scaled-dot-product
attention of the decoding rows' one query each against their slots, and one per prefilling chunk against its slot
(its earlier columns plus causal within the chunk). A step in which every row decodes (most steps) is a plain
batch ``[used, 1]`` instead, with the model's own attention over views of the slots and ``plan.mask``: on the
built-in model the packed layout's extra indexing cost ~10% of such a step.

Memory: ``2 x layers x slots x kv_heads x (region + length) x head_dim`` values of the model's dtype, allocated
when the decoder starts if it is given sizes, else at the first join. ``ptune serve`` sizes ``length`` to the
longest prompt (``max_source_length``) plus ``max_new_tokens_limit``: ChatGLM2-6B (28 layers, 2 key/value heads
of 128, float16: 28 KiB a token) with 16 slots, a 128-position prefix, 512-token prompts and 2048 new tokens
takes 16 x 2688 x 28 KiB = 1.15 GiB. Without sizes (the evaluator, the chat front ends) it is sized to the first
join's rows, and grows (one copy of the rows in use) only when a later join needs more slots or columns.

Not a ``transformers.Cache``: the model's attention calls only ``update``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward


@dataclass(frozen=True)
class Chunk:
    """A prefilling row's part of a step: ``length`` prompt tokens written from column ``column`` of ``slot``,
    at ``start`` in the step's packed sequence; ``mask`` ``[1, 1, length, column + length]``: the row's visible
    columns before the chunk, causal within it (built once a step, not in every layer)."""

    slot: int
    start: int
    column: int
    length: int
    mask: torch.Tensor


@dataclass(frozen=True)
class Plan:
    """One packed step: ``decoding`` rows' one token each (the sequence's first tokens, in ``decoding_slots``'
    order), then ``chunks``; ``slot`` and ``column`` ``[tokens]`` say where each token's key/value goes."""

    decoding: int
    decoding_slots: torch.Tensor
    decoding_width: int  # columns the decoding rows attend to: the widest one's, this step's token included
    contiguous: bool  # the decoding rows are slots 0 .. decoding - 1 (views, no scatter of queries)
    chunks: tuple[Chunk, ...]
    slot: torch.Tensor
    column: torch.Tensor | int  # int: one row decoding, at that column
    positions: torch.Tensor  # each token's rotary position in its row: [1, tokens]; [used, 1] with no chunks
    mask: torch.Tensor | None = None  # with no chunks: the rows' attention mask [used, 1, 1, width]


class SlotCache:
    """See the module docstring. ``region``: the prefix region's width (the longest prefix served, 0 for none)."""

    def __init__(self, layers: int, region: int, slots: int | None = None, length: int | None = None) -> None:
        self.layers, self.region = layers, region
        self.slots, self.length = slots or 0, length or 0  # what to allocate at the first write
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.visible = self.end = None
        self.used = 0  # slots 0 .. used - 1 hold rows
        self._slot_numbers = torch.arange(0)  # 0 .. slots - 1, for the steps in which every row decodes
        self._plan: Plan | None = None  # the step under way

    def open(self, prefixes: Sequence[torch.Tensor | None], like: torch.Tensor, length: int) -> None:
        """Take the next free slots for new rows, one per entry of ``prefixes`` (a row's prefix keys/values
        ``[layers, 2, kv_heads, positions, head_dim]``, or None for the bare base): its prefix is copied into the
        region's first columns, the rest masked; its prompt comes in the following steps. ``like`` gives the
        heads' shape and dtype, ``length`` the most tokens any of the rows will hold (prompt and answer)."""
        self.reserve(like, self.used + len(prefixes), length)
        for slot, prefix in enumerate(prefixes, start=self.used):
            self.visible[slot] = False
            if prefix is not None:
                width = prefix.shape[3]
                for layer in range(self.layers):
                    self.keys[layer][slot, :, :width] = prefix[layer, 0]
                    self.values[layer][slot, :, :width] = prefix[layer, 1]
                self.visible[slot, :width] = True
            self.end[slot] = self.region
        self.used += len(prefixes)

    def plan(self, decoding: Sequence[int], chunks: Sequence[tuple[int, int]]) -> Plan:
        """Before a step's forward: one token for each slot in ``decoding``, then ``length`` prompt tokens for each
        ``(slot, length)`` of ``chunks``. Marks the new columns visible and moves each row's end on."""
        end, used = self.end, self.used
        if not chunks and len(decoding) == used:  # every row decodes (most steps): a plain batch, see ``update``
            slot, positions = self._slot_numbers[:used], end[:used, None] - self.region
            if used == 1:  # one row (the chat front ends, one request at a time): slices, no indexed writes
                column = int(end[0])
                width = column + 1
                self.visible[0, column] = True
            else:
                column = end[:used].clone()
                width = int(column.max()) + 1
                self.visible[slot, column] = True
            mask = self.visible[:used, None, None, :width]
            plan = Plan(used, slot, width, True, (), slot, column, positions, mask)
            end[:used] += 1
            self._plan = plan
            return plan
        device = end.device
        decoding_slots = torch.tensor(list(decoding), dtype=torch.long, device=device)
        slots, columns = [decoding_slots], [end[decoding_slots]]
        placed, start = [], len(decoding)
        for row, length in chunks:
            first = int(end[row])
            earlier = self.visible[row, None, :first].expand(length, -1)
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            placed.append(Chunk(row, start, first, length, torch.cat([earlier, causal], dim=1)[None, None]))
            slots.append(torch.full((length,), row, dtype=torch.long, device=device))
            columns.append(torch.arange(first, first + length, device=device))
            start += length
        column = torch.cat(columns)
        plan = Plan(
            decoding=len(decoding),
            decoding_slots=decoding_slots,
            decoding_width=int(end[decoding_slots].max()) + 1 if len(decoding) else 0,
            contiguous=list(decoding) == list(range(len(decoding))),
            chunks=tuple(placed),
            slot=torch.cat(slots),
            column=column,
            positions=(column - self.region)[None],
        )
        self.visible[plan.slot, plan.column] = True
        end[:used] += torch.bincount(plan.slot, minlength=used)[:used]
        self._plan = plan
        return plan

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *_args, **_kwargs):
        """The model's attention, once per layer in a step. A packed step's ``[1, kv_heads, tokens, head_dim]``
        keys and values are scattered to their slots and columns, and ``attend`` reads them from the buffers
        returned. A step with no prompt chunk is a plain batch, one row per slot (``[used, kv_heads, 1,
        head_dim]``): each row's key/value is written at its column and every row's keys and values so far are
        returned (views) for the model's own attention with ``plan.mask``."""
        plan = self._plan
        if plan is None or key.shape[2 if plan.chunks else 0] != len(plan.slot):
            raise RuntimeError("SlotCache takes a step's tokens as ``plan`` laid them out")
        keys, values = self.keys[layer], self.values[layer]
        if plan.chunks:
            keys[plan.slot, :, plan.column] = key[0].transpose(0, 1)
            values[plan.slot, :, plan.column] = value[0].transpose(0, 1)
            return keys, values
        if isinstance(plan.column, int):
            keys[:1, :, plan.column : plan.column + 1] = key
            values[:1, :, plan.column : plan.column + 1] = value
        else:
            keys[plan.slot, :, plan.column] = key[:, :, 0]
            values[plan.slot, :, plan.column] = value[:, :, 0]
        width = plan.decoding_width
        return keys[: self.used, :, :width], values[: self.used, :, :width]

    def attend(self, module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, **kwargs):
        """The step's attention (``ptune_attention`` hook): ``query`` ``[1, heads, tokens, head_dim]`` packed as
        ``plan`` laid it out, ``keys``/``values`` this layer's buffers. Returns ``[1, tokens, heads, head_dim]``."""
        plan, used = self._plan, self.used
        kwargs.pop("is_causal", None)
        pieces = []
        if plan.decoding:
            width = plan.decoding_width
            asked = query[0, :, : plan.decoding].transpose(0, 1).unsqueeze(2)  # [decoding, heads, 1, head_dim]
            if plan.contiguous:
                rows = plan.decoding
            else:  # a prefilling row sits among them: every slot asks (the others a zero query, dropped after)
                rows, scattered = used, asked.new_zeros(used, *asked.shape[1:])
                scattered[plan.decoding_slots] = asked
                asked = scattered
            mask = self.visible[:rows, None, None, :width]
            out, _ = sdpa_attention_forward(
                module, asked, keys[:rows, :, :width], values[:rows, :, :width], mask, **kwargs
            )
            if not plan.contiguous:
                out = out[plan.decoding_slots]
            pieces.append(out.reshape(1, plan.decoding, *out.shape[2:]))
        for chunk in plan.chunks:
            width = chunk.column + chunk.length
            asked = query[:, :, chunk.start : chunk.start + chunk.length]
            here = slice(chunk.slot, chunk.slot + 1)
            out, _ = sdpa_attention_forward(
                module, asked, keys[here, :, :width], values[here, :, :width], chunk.mask, **kwargs
            )
            pieces.append(out)
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0], None

    def free(self, slots: list[int]) -> list[int]:
        """Free ``slots``; the last slots' rows move into the gaps. Returns, for each slot in use after, the slot
        its row was in before (the caller reorders its rows alike)."""
        order = list(range(self.used))
        for slot in sorted(set(slots), reverse=True):  # from the top, so the last slot is never one being freed
            last = self.used - 1
            if slot != last:
                self._move(last, slot)
                order[slot] = order[last]
            order.pop()
            self.used -= 1
        return order

    def _move(self, source: int, target: int) -> None:
        width = int(self.end[source])
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :width] = keys[source, :, :width]
            values[target, :, :width] = values[source, :, :width]
        self.visible[target] = self.visible[source]
        self.end[target] = self.end[source]

    def reserve(self, like: torch.Tensor, slots: int, length: int) -> None:
        """Buffers for at least ``slots`` rows of ``length`` tokens after the region, shaped and typed as ``like``'s
        heads: allocated once (``BatchDecoder`` does it at its start when it is given sizes, so that the first
        request does not pay for zeroing them, and a cache too large fails then), grown (the rows in use copied
        over) only when a join needs more."""
        current = self.keys[0] if self.keys else None
        fits = current is not None and slots <= current.shape[0] and self.region + length <= current.shape[2]
        if fits and current.dtype == like.dtype and current.shape[1::2] == like.shape[1::2]:
            return
        slots, length = max(slots, self.slots), max(length, self.length)
        _, heads, _, dim = like.shape
        old = (self.keys, self.values, self.visible, self.end)
        shape = (slots, heads, self.region + length, dim)
        self.keys = [like.new_zeros(shape) for _ in range(self.layers)]
        self.values = [like.new_zeros(shape) for _ in range(self.layers)]
        self.visible = torch.zeros(slots, self.region + length, dtype=torch.bool, device=like.device)
        self.end = torch.zeros(slots, dtype=torch.long, device=like.device)
        self._slot_numbers = torch.arange(slots, device=like.device)
        self.slots, self.length = slots, length
        if old[0] and self.used:
            used, width = self.used, int(old[3][: self.used].max())
            for new, was in zip([*self.keys, *self.values], [*old[0], *old[1]], strict=True):
                new[:used, :, :width] = was[:used, :, :width]
            self.visible[:used, :width] = old[2][:used, :width]
            self.end[:used] = old[3][:used]
