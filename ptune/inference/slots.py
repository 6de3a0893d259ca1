"""The per-slot KV cache of ``BatchDecoder``: buffers allocated once per layer for a number of rows (slots), so a
row joins by writing its keys/values into a free slot and leaves by freeing it. transformers' ``DynamicCache``
instead concatenates every layer's whole cache at every step, and joining or leaving a batch held in one had to
left-pad and re-index the whole batch's cache.

Layout, per layer: ``keys`` and ``values`` are ``[slots, kv_heads, region + length, head_dim]``, slot ``k`` holding
the batch's row ``k``. Columns ``0 .. region`` hold the row's prefix keys/values (its own prefix in the first
columns; the rest of the region masked); from ``region`` on, the row's prompt (after the padding of the group it
joined with) and answer tokens, each new one written at the row's own write column (``end``). ``visible``
``[slots, region + length]`` marks the columns each row attends to (its prefix and its tokens so far), and
``position`` is the rotary position of its next token (0 at its first real token), so a row's answer is the one
it gets alone. The slots in use are always ``0 .. used - 1``: a leaving row's slot receives the last slot's row
(a copy of that one row), so a step's forward reads views ``[:used, :, :width]`` of the buffers, never a gather.

Memory: ``2 x layers x slots x kv_heads x (region + length) x head_dim`` values of the model's dtype, allocated
when the decoder starts if it is given sizes, else at the first join. ``ptune serve`` sizes ``length`` to the
longest prompt (``max_source_length``) plus ``max_new_tokens_limit``: ChatGLM2-6B (28 layers, 2 key/value heads
of 128, float16: 28 KiB a token) with 16 slots, a 128-position prefix, 512-token prompts and 2048 new tokens
takes 16 x 2688 x 28 KiB = 1.15 GiB. Without sizes (the evaluator, the chat front ends) it is sized to the first
join's rows, and grows (one copy of the rows in use) only when a later join needs more slots or columns.

Not a ``transformers.Cache``: the model's attention calls only ``update``, and the decoder passes a ready 4-D mask
(``step_mask``), which transformers' mask building returns as it is.
"""

from __future__ import annotations

import torch


class SlotCache:
    """See the module docstring. ``region``: the prefix region's width (the longest prefix served, 0 for none)."""

    def __init__(self, layers: int, region: int, slots: int | None = None, length: int | None = None) -> None:
        self.layers, self.region = layers, region
        self.slots, self.length = slots or 0, length or 0  # what to allocate at the first write
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.visible = self.end = self.position = None
        self.used = 0  # slots 0 .. used - 1 hold rows
        self.width = region  # columns holding data in some slot in use: every step reads this many plus one
        self.dense = True  # every row in use attends to all ``width`` columns (no padding, one length)
        self._columns: torch.Tensor | int | None = None  # during a step: each row's write column (dense: theirs)

    def write(self, prefilled, mask: torch.Tensor, positions: torch.Tensor, new_tokens: int) -> None:
        """Put a freshly prefilled group of rows in the next free slots: ``prefilled``'s layers hold their keys and
        values ``[rows, kv_heads, columns, head_dim]`` (prefix region, padded prompts), ``mask`` ``[rows, columns]``
        what each attends to, ``positions`` ``[rows]`` their next positions; ``new_tokens``, the most any of them
        will add, sizes the buffers if they must grow."""
        rows, columns = mask.shape
        self.reserve(prefilled.layers[0].keys, self.used + rows, columns - self.region + new_tokens)
        here = slice(self.used, self.used + rows)
        for layer, source in enumerate(prefilled.layers):
            self.keys[layer][here, :, :columns] = source.keys
            self.values[layer][here, :, :columns] = source.values
        self.visible[here] = False
        self.visible[here, :columns] = mask.bool()
        self.end[here], self.position[here] = columns, positions
        self.dense = (self.used == 0 or (self.dense and self.width == columns)) and bool(mask.all())
        self.used += rows
        self.width = max(self.width, columns)

    def step_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Before a step's forward: each row's next token goes in at its write column. The step's attention mask
        ``[used, 1, 1, width]`` (its prefix, its tokens and the new one) and its positions ``[used, 1]``."""
        used = self.used
        if self.dense:  # every row writes at column ``width``: a slice, not a scatter
            self._columns = self.width
            self.visible[:used, self.width] = True
        else:
            self._columns = self.end[:used].clone()
            self.visible[torch.arange(used, device=self.end.device), self._columns] = True
        positions = self.position[:used, None].clone()
        self.end[:used] += 1
        self.position[:used] += 1
        self.width += 1
        return self.visible[:used, None, None, : self.width], positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *_args, **_kwargs):
        """The model's attention, once per layer in a step: write the rows' new ``[used, kv_heads, 1, head_dim]``
        key and value at their write columns and return every row's keys and values so far (views)."""
        if key.shape[2] != 1 or self._columns is None:
            raise RuntimeError("SlotCache takes one token per row per step; a prompt is prefilled apart (write)")
        used, column = self.used, self._columns
        if isinstance(column, int):
            self.keys[layer][:used, :, column : column + 1] = key
            self.values[layer][:used, :, column : column + 1] = value
        else:
            rows = torch.arange(used, device=key.device)
            self.keys[layer][rows, :, column] = key[:, :, 0]
            self.values[layer][rows, :, column] = value[:, :, 0]
        return self.keys[layer][: self.used, :, : self.width], self.values[layer][: self.used, :, : self.width]

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
        self.width = int(self.end[: self.used].max()) if self.used else self.region
        self.dense = bool(self.visible[: self.used, : self.width].all())
        return order

    def _move(self, source: int, target: int) -> None:
        width = int(self.end[source])
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :width] = keys[source, :, :width]
            values[target, :, :width] = values[source, :, :width]
        self.visible[target] = self.visible[source]
        self.end[target], self.position[target] = self.end[source], self.position[source]

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
        old = (self.keys, self.values, self.visible, self.end, self.position)
        shape = (slots, heads, self.region + length, dim)
        self.keys = [like.new_zeros(shape) for _ in range(self.layers)]
        self.values = [like.new_zeros(shape) for _ in range(self.layers)]
        self.visible = torch.zeros(slots, self.region + length, dtype=torch.bool, device=like.device)
        self.end = torch.zeros(slots, dtype=torch.long, device=like.device)
        self.position = torch.zeros_like(self.end)
        self.slots, self.length = slots, length
        if old[0] and self.used:
            used, width = self.used, self.width
            for new, was in zip([*self.keys, *self.values], [*old[0], *old[1]], strict=True):
                new[:used, :, :width] = was[:used, :, :width]
            self.visible[:used, :width] = old[2][:used, :width]
            self.end[:used], self.position[:used] = old[3][:used], old[4][:used]
