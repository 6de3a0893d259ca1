"""The HTTP process's side of the engine (``ptune.serve.engine``): start it, hand it requests, route its events
back to the requests waiting for them, and notice when it dies. Imports no torch.

``submit`` sends a request and returns a ``concurrent.futures.Future`` for its answer; a streaming request's text
so far reaches its ``on_text`` callback. Both happen in the receiver thread, which reads the engine's event
messages (one per decode step), so the event loop only ever waits on futures. Requests in flight beyond
``max_batch_size + max_queue`` are refused at once (``QueueFull``, HTTP 503): the engine fills every free slot at
each step, so that many in flight means ``max_queue`` of them wait.

A dead engine (killed, out of memory, crashed) is seen by a thread that waits on the process: every request in
flight fails with ``EngineDead`` (HTTP 503, saying so), later ones are refused the same way, ``health`` says so,
and ``on_dead`` is called (``ptune serve`` then exits non-zero, see ``ptune.serve.app``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import zmq
from omegaconf import DictConfig, OmegaConf

from ptune.serve import ipc

START_TIMEOUT_SECONDS = 600  # loading a 6B base from a slow disk takes minutes; a tiny model seconds
logger = logging.getLogger("ptune.serve.app")


class QueueFull(Exception):
    """More requests are waiting than ``max_queue`` allows."""


class EngineDead(Exception):
    """The engine process is gone; no request can be answered."""


class EngineFailed(Exception):
    """The engine could not start (bad config, model not loadable); ``code`` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class RequestFailed(Exception):
    """The engine could not answer this request (its prompt, its settings, a failed step)."""


@dataclasses.dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token) or "length" (max_new_tokens reached)


class Process(Protocol):
    """What the client needs of the engine's process (``subprocess.Popen``, or a thread in tests)."""

    pid: int

    def wait(self, timeout: float | None = None) -> int | None: ...

    def kill(self) -> None: ...


@dataclasses.dataclass(eq=False)
class _Pending:
    future: concurrent.futures.Future
    on_text: Callable[[str], None] | None


class EngineClient:
    """See the module docstring. ``start`` launches the engine on the folder with the sockets and the config;
    the default is ``python -m ptune.serve.engine FOLDER``."""

    def __init__(
        self,
        cfg: DictConfig,
        start: Callable[[Path], Process] | None = None,
        on_dead: Callable[[int], None] | None = None,
    ) -> None:
        self.max_batch_size, self.max_queue = int(cfg.max_batch_size), int(cfg.max_queue)
        if self.max_batch_size < 1 or self.max_queue < 0:
            raise ValueError(
                f"max_batch_size must be >= 1 and max_queue >= 0, got {self.max_batch_size} and {self.max_queue}"
            )
        if int(cfg.step_tokens) <= self.max_batch_size:
            raise ValueError(
                f"step_tokens={cfg.step_tokens} must be larger than max_batch_size={self.max_batch_size}: a step "
                "takes one token of every decoding row before any prompt's; raise step_tokens"
            )
        self.folder = Path(tempfile.mkdtemp(prefix="ptune-serve-"))  # mode 0700: only this user reaches the sockets
        (self.folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        self._context = zmq.Context()
        self._requests = ipc.socket(self._context, zmq.PUSH, ipc.address(self.folder, ipc.REQUESTS), bind=True)
        self._events = ipc.socket(self._context, zmq.PULL, ipc.address(self.folder, ipc.EVENTS), bind=True)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._stats: dict[str, int] = {"batch": 0, "largest_batch": 0, "slots_in_use": 0}
        self.exit_code: int | None = None  # set when the engine process has ended
        self.died = False  # it ended without being told to (close)
        self._closing = False
        self.on_dead = on_dead
        self.process = (start or _engine_process)(self.folder)
        self.ready = self._wait_ready()
        self.models: list[str] = self.ready["models"]  # the names served, the default first
        self._receiver = threading.Thread(target=self._receive, name="ptune-engine-events", daemon=True)
        self._receiver.start()
        self._watcher = threading.Thread(target=self._watch, name="ptune-engine-watch", daemon=True)
        self._watcher.start()

    # -- used by the HTTP routes (event loop thread) --

    def submit(self, request: dict[str, Any], on_text: Callable[[str], None] | None = None) -> tuple[str, Any]:
        """Send ``request`` (query, history, settings, max_length, stream) to the engine: its id and future."""
        with self._lock:
            if self.exit_code is not None:
                raise EngineDead(self.dead_message())
            if len(self._pending) >= self.max_batch_size + self.max_queue:
                waiting = len(self._pending) - self._stats["batch"]
                raise QueueFull(f"{waiting} requests are waiting (max_queue={self.max_queue})")
            job_id = str(next(self._ids))
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._pending[job_id] = _Pending(future, on_text)
        self._send({"op": "submit", "id": job_id, **request})
        return job_id, future

    def cancel(self, job_id: str) -> None:
        """The client of ``job_id`` left: its row leaves the batch at the next step (its slot counts until then)."""
        if self.exit_code is None:
            self._send({"op": "cancel", "id": job_id})

    def health(self) -> dict[str, Any]:
        with self._lock:
            in_flight, batch = len(self._pending), self._stats["batch"]
            largest, slots = self._stats["largest_batch"], self._stats["slots_in_use"]
        return {
            "engine": "alive" if self.exit_code is None else self.dead_message(),
            "engine_pid": self.process.pid,
            "queue": max(0, in_flight - batch),
            "batch": batch,
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "largest_batch": largest,
            "slots_in_use": slots,  # rows holding a cache slot in the engine's decoder, of max_batch_size
            "prefixes": self.ready["prefixes"],  # the names served with a prefix (the bare base has none)
        }

    def dead_message(self) -> str:
        return (
            f"the engine process (pid {self.process.pid}) exited with status {self.exit_code}; "
            "this server cannot answer and is shutting down"
        )

    def close(self, timeout: float = 10) -> None:
        """Tell the engine to stop, wait for it (killing it after ``timeout``), and remove the sockets' folder."""
        if self._closing:
            return
        self._closing = True
        if self.exit_code is None:
            self._send({"op": "shutdown"})
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._watcher.join(timeout)
        self._receiver.join(timeout)
        self._events.close()
        self._requests.close()
        self._context.term()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- threads --

    def _send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            self._requests.send(ipc.pack(message))

    def _wait_ready(self) -> dict[str, Any]:
        """The engine's first message: ready (with the model's name), or why it could not start."""
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        for _ in range(START_TIMEOUT_SECONDS * 10):
            if poller.poll(100):
                message = ipc.unpack(self._events.recv())
                if "failed" in message:
                    self.process.wait(30)
                    self._close_sockets()
                    raise EngineFailed(message["failed"]["message"], message["failed"]["code"])
                return message["ready"]
            code = _returncode(self.process)
            if code is not None:
                self._close_sockets()
                raise EngineFailed(f"the engine process exited with status {code} before it was ready", 1)
        self.process.kill()
        self._close_sockets()
        raise EngineFailed(f"the engine was not ready within {START_TIMEOUT_SECONDS} s", 1)

    def _close_sockets(self) -> None:
        self._events.close()
        self._requests.close()
        self._context.term()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _receive(self) -> None:
        while self.exit_code is None:
            if not self._events.poll(200):
                continue
            for event in ipc.unpack(self._events.recv())["events"]:
                self._route(event)

    def _route(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "stats":
            with self._lock:
                self._stats = {key: event[key] for key in self._stats}
            return
        with self._lock:
            pending = self._pending.get(event["id"]) if kind == "text" else self._pending.pop(event["id"], None)
        if pending is None or pending.future.cancelled():
            return
        if kind == "text":
            if pending.on_text is not None:
                pending.on_text(event["text"])
        elif kind == "done":
            fields = {f.name: event[f.name] for f in dataclasses.fields(Answer)}
            pending.future.set_result(Answer(**fields))
        elif kind == "error":
            pending.future.set_exception(RequestFailed(event["message"]))
        # "cancelled": nothing to answer; the slot is free

    def _watch(self) -> None:
        code = self.process.wait()
        with self._lock:
            self.exit_code = code
            pending, self._pending = list(self._pending.values()), {}
        if self._closing:
            return
        self.died = True
        logger.error("ptune serve: %s", self.dead_message())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(EngineDead(self.dead_message()))
        if self.on_dead is not None:
            self.on_dead(code)


def _engine_process(folder: Path) -> subprocess.Popen:
    """``python -m ptune.serve.engine FOLDER``; its log lines go where this process's go."""
    return subprocess.Popen([sys.executable, "-m", "ptune.serve.engine", str(folder)])


def _returncode(process: Process) -> int | None:
    try:
        return process.wait(0)
    except subprocess.TimeoutExpired:
        return None
