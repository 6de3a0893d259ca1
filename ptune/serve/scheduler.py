"""The batching scheduler of ``ptune serve``'s engine process: continuous batching over one ``BatchDecoder``,
driven a turn at a time by the engine's busy loop (``ptune.serve.engine``), in one thread, with no HTTP work.

Each turn (``run_once``): waiting requests join the batch while there are free slots (up to ``max_batch_size``;
each takes a free slot of the decoder's per-slot cache), rows whose client left or that ended (an end token or
their own ``max_new_tokens``) are answered and free their slot, streaming rows get their text so far, and one
forward (``BatchDecoder.step``) gives every decoding row its next token and prefills the joined rows' prompts in
the same pass (chunked under ``step_tokens``). So a request that arrives while others decode waits one step, not
for the whole batch, and its prompt costs the batch no forward of its own; with ``max_batch_size=1`` requests run
one at a time in arrival order. A request's generation settings stay its own (greedy and sampled rows share a batch).

What a turn produced comes back as a list of events (plain dicts, sent as one message): ``text`` (a streaming
row's answer so far), ``done`` (the answer and its token counts), ``error`` (this request alone failed: its
settings, its prompt, its token choice; a failed forward of the whole batch fails the rows in it) and ``stats``
(the batch size and the slots in use, when they changed).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch

from ptune.inference.generation import BatchDecoder, Row, decode
from ptune.inference.loading import LoadedModel
from ptune.inference.streaming import TextSoFar

logger = logging.getLogger(__name__)
Event = dict


@dataclasses.dataclass(eq=False)
class Job:
    """One request: ``prepare`` (called when it joins) gives its prompt ids and settings (and its prefix, see
    ``BatchDecoder.new_row``; the loaded model's own if left out); ``stream``: send its text as it grows;
    ``stopped``: its client left."""

    id: str
    prepare: Callable[[], tuple]
    stream: bool = False
    stopped: bool = False
    row: Row | None = None
    text: TextSoFar | None = None  # streaming only: the answer so far, as last sent


class Scheduler:
    """The waiting queue and the batch in flight; see the module docstring. Not thread-safe: the engine's one
    thread calls ``submit``, ``cancel`` and ``run_once``."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int,
        other_prefixes: Sequence[torch.Tensor] = (),
        row_tokens: int | None = None,
        step_tokens: int | None = None,
    ) -> None:
        """``row_tokens``: the most tokens a row holds, prompt and answer (the engine: the longest prompt plus
        max_new_tokens_limit), so that the decoder's cache slots are allocated once at their full size;
        ``step_tokens``: the most tokens a step's forward takes (``BatchDecoder``)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.loaded, self.max_batch_size, self.other_prefixes = loaded, max_batch_size, list(other_prefixes)
        self.row_tokens, self.step_tokens = row_tokens, step_tokens
        self.decoder = self._new_decoder()
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.largest_batch = 0
        self._reported_batch = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def submit(self, job: Job) -> None:
        self.waiting.append(job)

    def cancel(self, job_id: str) -> list[Event]:
        """The client of ``job_id`` left: a waiting job is dropped at once, a decoding one leaves at the next turn."""
        for job in self.waiting:
            if job.id == job_id:
                self.waiting.remove(job)
                return [{"kind": "cancelled", "id": job_id}]
        for job in self.active:
            if job.id == job_id:
                job.stopped = True
        return []

    def run_once(self) -> list[Event]:
        events: list[Event] = []
        joining = [self.waiting.popleft() for _ in range(min(self._slots_to_fill(), len(self.waiting)))]
        self._admit(joining, events)
        self._report(events)
        try:
            if self.decoder.rows:
                self.decoder.step()
        except Exception as err:  # a failed forward of the whole batch fails its rows; a fresh batch goes on
            logger.exception("generation failed for %d request(s)", len(self.active))
            events += [_error(job, err) for job in self.active]
            self.active = []
            self.decoder = self._new_decoder()
        if len(self.active) != self._reported_batch:
            self._reported_batch = len(self.active)
            slots = len(self.decoder.rows)  # rows holding a cache slot (a stopped row's until it is answered)
            events.append(
                {"kind": "stats", "batch": len(self.active), "largest_batch": self.largest_batch, "slots_in_use": slots}
            )
        return events

    def _new_decoder(self) -> BatchDecoder:
        return BatchDecoder(self.loaded, self.other_prefixes, self.max_batch_size, self.row_tokens, self.step_tokens)

    def fail_all(self, err: BaseException) -> list[Event]:
        """Every request waiting or in flight fails with ``err`` (the engine is shutting down)."""
        events = [_error(job, err) for job in [*self.active, *self.waiting]]
        self.active, self.waiting = [], collections.deque()
        return events

    def _slots_to_fill(self) -> int:
        """How many waiting requests join before the next step: every free slot (continuous batching)."""
        return self.max_batch_size - len(self.active)

    def _admit(self, joining: list[Job], events: list[Event]) -> None:
        """Give the joining requests slots in the batch (their prompts are prefilled by the next steps). A request
        whose settings or prompt fail is answered with its error alone; the running rows are not touched (a job
        joins ``active`` only once its row is in the batch)."""
        ready: list[Job] = []
        for job in joining:
            try:
                job.row = self.decoder.new_row(*job.prepare())
            except Exception as err:
                logger.warning("a request failed before it joined the batch: %s: %s", type(err).__name__, err)
                events.append(_error(job, err))
                continue
            ready.append(job)
        if not ready:
            return
        try:
            self.decoder.join([job.row for job in ready])
        except Exception as err:  # e.g. no memory for more cache slots: the running batch is as it was
            logger.exception("%d request(s) could not join the batch", len(ready))
            events += [_error(job, err) for job in ready]
            return
        for job in ready:
            if job.stream:
                job.text = TextSoFar(self.loaded.tokenizer, job.row.ids)
        self.active.extend(ready)
        self.largest_batch = max(self.largest_batch, len(self.active))

    def _report(self, events: list[Event]) -> None:
        """Send streaming rows their text, answer the rows that ended and the abandoned ones, and take them out."""
        tokenizer = self.loaded.tokenizer
        ended: list[Job] = []
        for job in self.active:
            row = job.row
            if job.stopped:  # the client left: nobody reads the answer
                events.append(_done(job, "", "stop"))
            elif row.error is not None:  # this row alone: its batch-mates go on
                logger.warning("a request failed while decoding: %s: %s", type(row.error).__name__, row.error)
                events.append(_error(job, row.error))
            elif row.finish:
                text = decode(tokenizer, row.ids)
                if job.text is not None and text != job.text.shown:
                    events.append({"kind": "text", "id": job.id, "text": text})
                events.append(_done(job, text, row.finish))
            else:
                if job.text is not None:
                    sent = job.text.shown
                    if job.text.update() != sent:
                        events.append({"kind": "text", "id": job.id, "text": job.text.shown})
                continue
            ended.append(job)
        if ended:
            self.decoder.remove([job.row for job in ended])
            self.active = [job for job in self.active if job not in ended]


def _done(job: Job, text: str, finish: str) -> Event:
    row = job.row
    return {
        "kind": "done",
        "id": job.id,
        "text": text,
        "prompt_tokens": len(row.prompt),
        "completion_tokens": len(row.ids),
        "finish_reason": finish,  # "stop" (end token) or "length" (max_new_tokens reached)
    }


def _error(job: Job, err: BaseException) -> Event:
    return {"kind": "error", "id": job.id, "message": f"{type(err).__name__}: {err}"}
