"""The batching scheduler of ``ptune serve``: one worker thread owns the model and decodes every request in flight
together, with continuous batching.

Each turn of the worker's loop: rows whose client left are removed, waiting requests join the batch while there
are free slots (up to ``max_batch_size``; they are encoded together and merged into the running batch), every row
gets one new token (``ptune.inference.generation.BatchDecoder.step``), streaming rows are sent their text so far,
and rows
that ended (an end token or their own ``max_new_tokens``) are answered and free their slot. So a request that
arrives while others decode waits one step, not for the whole batch; with ``max_batch_size=1`` requests run one at
a time in arrival order. A request's generation settings stay its own (greedy and sampled rows share a batch).

The model and the tokenizer are used in the worker thread only (neither is thread-safe). The event loop hands a
job in with ``submit`` and waits on its future; streamed text comes back through the job's ``on_text`` callback.
Requests waiting beyond ``max_queue`` are refused (``QueueFull``, HTTP 503), so overload gets an answer at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Callable

from ptune.inference.generation import BatchDecoder, GenerationSettings, Row, TextSoFar, decode
from ptune.inference.loading import LoadedModel

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than ``max_queue`` allows."""


@dataclasses.dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token) or "length" (max_new_tokens reached)


@dataclasses.dataclass(eq=False)
class Job:
    """One request: ``prepare`` (run in the worker) gives its prompt ids and settings; ``stop`` is set when its
    client leaves; ``on_text`` (streaming only) receives the answer so far, in the worker thread."""

    prepare: Callable[[], tuple[list[int], GenerationSettings]]
    stop: threading.Event
    on_text: Callable[[str], None] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    row: Row | None = None
    text: TextSoFar | None = None  # streaming only: the answer so far, as last sent to ``on_text``


class Scheduler:
    """The worker thread and its queue; see the module docstring."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int, max_queue: int) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size} and {max_queue}")
        self.loaded, self.max_batch_size, self.max_queue = loaded, max_batch_size, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._changed = threading.Condition()
        self._closed = False
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._serve, name="ptune-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._changed:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue and len(self._active) + len(self._waiting) >= self.max_batch_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(job)
            self._changed.notify()
        return job.future

    def health(self) -> dict:
        with self._changed:
            return {
                "queue": len(self._waiting),
                "batch": len(self._active),
                "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue,
                "largest_batch": self.largest_batch,
            }

    def close(self, timeout: float | None = None) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout)

    # -- the worker thread --

    def _serve(self) -> None:
        decoder = BatchDecoder(self.loaded)
        while True:
            with self._changed:
                while not self._waiting and not self._active and not self._closed:
                    self._changed.wait()
                if self._closed:
                    break
                joining = [self._waiting.popleft() for _ in range(min(self._slots_to_fill(), len(self._waiting)))]
            try:
                self._admit(decoder, joining)
                self._report(decoder)
                if decoder.rows:
                    decoder.step()
            except Exception as err:  # a failed forward of the whole batch fails its rows; a fresh batch goes on
                logger.exception("generation failed for %d request(s)", len(self._active))
                for job in self._active:
                    _fail(job, err)
                with self._changed:
                    self._active = []
                decoder = BatchDecoder(self.loaded)
        for job in [*self._active, *self._waiting]:
            _fail(job, RuntimeError("the server shut down before the answer was complete"))

    def _slots_to_fill(self) -> int:
        """How many waiting requests join before the next step: every free slot (continuous batching)."""
        return self.max_batch_size - len(self._active)

    def _admit(self, decoder: BatchDecoder, joining: list[Job]) -> None:
        """Encode the joining requests together and add them to the batch (skipping those whose client left). A
        request whose settings or prompt fail is answered with its error alone; the running rows are not touched
        (they join ``_active`` only once their rows are in the batch)."""
        ready: list[Job] = []
        for job in joining:
            if job.stop.is_set():  # its client left while it waited
                job.future.cancel()
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.row = decoder.new_row(*job.prepare())
            except Exception as err:
                logger.warning("a request failed before it joined the batch: %s: %s", type(err).__name__, err)
                _fail(job, err)
                continue
            ready.append(job)
        if not ready:
            return
        try:
            decoder.join([job.row for job in ready])
        except Exception as err:  # the joining rows' own forward: the running batch is as it was
            logger.exception("encoding %d joining request(s) failed", len(ready))
            for job in ready:
                _fail(job, err)
            return
        for job in ready:
            if job.on_text is not None:
                job.text = TextSoFar(self.loaded.tokenizer, job.row.ids)
        with self._changed:
            self._active.extend(ready)
            self.largest_batch = max(self.largest_batch, len(self._active))

    def _report(self, decoder: BatchDecoder) -> None:
        """Send streaming rows their text, remove the rows that ended and the abandoned ones, then answer them (so
        ``/health`` never counts an answered request as in flight)."""
        tokenizer = self.loaded.tokenizer
        done: list[tuple[Job, Answer | Exception]] = []
        for job in self._active:
            row = job.row
            if job.stop.is_set():  # the client left: nobody reads the answer
                done.append((job, Answer("", len(row.prompt), len(row.ids), "stop")))
            elif row.error is not None:  # this row alone: its batch-mates go on
                logger.warning("a request failed while decoding: %s: %s", type(row.error).__name__, row.error)
                done.append((job, row.error))
            elif row.finish:
                text = decode(tokenizer, row.ids)
                if job.text is not None and text != job.text.shown:
                    job.on_text(text)
                done.append((job, Answer(text, len(row.prompt), len(row.ids), row.finish)))
            elif job.text is not None:
                sent = job.text.shown
                if job.text.update() != sent:
                    job.on_text(job.text.shown)
        if not done:
            return
        ended = [job for job, _ in done]
        decoder.remove([job.row for job in ended])
        with self._changed:
            self._active = [job for job in self._active if job not in ended]
        for job, answer in done:
            if isinstance(answer, Exception):
                _fail(job, answer)
            else:
                job.future.set_result(answer)


def _fail(job: Job, err: BaseException) -> None:
    if not job.future.done() and (job.future.running() or job.future.set_running_or_notify_cancel()):
        job.future.set_exception(err)
