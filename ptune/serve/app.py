"""``ptune serve``: an HTTP API over the one generation path (``ptune.inference.generation``), FastAPI under uvicorn.

    ptune serve checkpoint=outputs/DATE/TIME/checkpoint-200 [port=8000] [host=0.0.0.0] [api_key=SECRET]

Endpoints:
  POST /                     ChatGLM2's reference ``api.py`` shape, so its clients keep working (``serve_reference``)
  POST /v1/chat/completions  OpenAI-compatible chat; ``"stream": true`` sends server-sent events
  GET  /v1/models            the one model served: "<base folder>/<checkpoint folder>" (or the base's name)
  GET  /health               queue length, batch in flight, the limits, the largest batch so far

The modules: this one (the service, the ``/v1`` and ``/health`` routes, streaming, the command line);
``serve_http`` (error shape, API key and body-size gate, OpenAI request bodies); ``serve_reference`` (``POST /``);
``serve_scheduler`` (the worker thread that batches concurrent requests).

Choices:
- System messages (OpenAI ``system`` or ``developer`` roles) may only open the conversation; ChatGLM2's prompt
  format has no system turn, so their text goes in front of the first user message (blank line between). The
  prompt of a growing conversation then keeps the same beginning. After them, user and assistant messages
  alternate and the last one is the user's query; anything else is a 422 saying what is wrong.
- ``max_tokens`` / ``max_completion_tokens`` (``/v1``) over ``max_new_tokens_limit`` is a 422 (as OpenAI refuses a
  too-large ``max_tokens``), not silently cut. ``temperature`` 0 means greedy; a positive one turns sampling on
  (``ptune.frontends.common.generation_settings``); left out, ``conf/chat.yaml``'s ``generation`` decides. A sampled
  request draws from its own generator seeded with its ``seed``, so its answer does not depend on its batch.
- Prompt plus history (system text included) longer than ``max_input_chars`` characters is a 413; wrong types, an
  empty prompt, empty messages are 422, a body that is not JSON is 400.
- With ``api_key`` set, every request needs ``Authorization: Bearer <api_key>`` (401 otherwise, compared in
  constant time), the docs pages included; ``GET /health`` without it answers ``{"status": "ok"}`` only (a load
  balancer's liveness probe has no key), with it the details.

Concurrency: one worker thread owns the model (``serve_scheduler``): requests in flight are decoded together, up
to ``max_batch_size``, a new one joining at the next step; each gets its own settings and its own tokens. More
than ``max_queue`` requests waiting for a slot get a 503 with ``Retry-After``. The event loop only waits for
results, so it keeps answering (``/v1/models``, ``/health``, validation errors) while answers are generated. A
streaming request's text reaches the event loop through an ``asyncio.Queue``. When a client disconnects
(streaming: its response stops; otherwise checked every ``DISCONNECT_POLL_SECONDS`` while it waits), its stop
event is set and its row leaves the batch at the next step; the other rows go on undisturbed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from omegaconf import DictConfig
from starlette.types import Receive, Scope, Send

from ptune.frontends.common import describe, generation_settings
from ptune.frontends.start import LOOPBACK, configured_api_key, frontend_setup
from ptune.inference.generation import GenerationSettings, encode_prompt, fit_history
from ptune.inference.loading import LoadedModel
from ptune.serve.protocol import ApiError, ChatCompletionRequest, Pairs, RequestGate, install_error_handlers, to_query
from ptune.serve.reference import add_reference_route, answer_tokens
from ptune.serve.scheduler import Answer, Job, QueueFull, Scheduler

DEFAULT_PORT = 8000
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting non-streaming request checks that its client is still there
RETRY_AFTER_SECONDS = 1  # a full queue drains in about an answer's time on the built-in model; clients back off
logger = logging.getLogger(__name__)


def model_id(loaded: LoadedModel) -> str:
    base = Path(loaded.base_path).name
    return f"{base}/{Path(loaded.checkpoint).name}" if loaded.checkpoint else base


class Service:
    """What the endpoints share: the config, the loaded model and the scheduler that runs it."""

    def __init__(self, cfg: DictConfig, loaded: LoadedModel) -> None:
        self.cfg, self.loaded = cfg, loaded
        self.limit = int(cfg.max_new_tokens_limit)
        self.max_input_chars = int(cfg.max_input_chars)
        self.model_id = model_id(loaded)
        self.created = int(time.time())
        self.scheduler = Scheduler(loaded, int(cfg.max_batch_size), int(cfg.max_queue))

    def check_input(self, query: str, history: Pairs) -> None:
        chars = len(query) + sum(len(q) + len(a) for q, a in history)
        if chars > self.max_input_chars:
            raise ApiError(
                413,
                f"the input is {chars} characters (prompt and history); this server takes at most "
                f"{self.max_input_chars} (max_input_chars)",
                "input_too_long",
            )

    def settings(
        self, max_new_tokens: int | None = None, field: str = "max_tokens", **request: float | int | None
    ) -> GenerationSettings:
        """The request's generation settings; asking for more than ``max_new_tokens_limit`` new tokens is a 422."""
        if max_new_tokens is not None and max_new_tokens > self.limit:
            raise ApiError(
                422,
                f"{field}={max_new_tokens} is more than this server's limit of {self.limit} new tokens "
                "(max_new_tokens_limit)",
                "max_tokens_too_large",
                field,
            )
        return generation_settings(self.cfg, max_new_tokens=max_new_tokens, **request)

    def submit(
        self,
        query: str,
        history: Pairs,
        settings: GenerationSettings,
        stop: threading.Event,
        max_length: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> concurrent.futures.Future:
        """Queue a request for the scheduler; a full queue is a 503 with ``Retry-After``."""

        def prepare() -> tuple[list[int], GenerationSettings]:  # in the worker thread, where the tokenizer is used
            kept, dropped = fit_history(self.loaded, query, history)
            if dropped:
                logger.info("left out the oldest %d turn(s) of a request's history (max_source_length)", dropped)
            prompt = encode_prompt(self.loaded, query, kept)
            if max_length is None:
                return prompt, settings
            new_tokens = answer_tokens(max_length, len(prompt), self.limit)
            return prompt, dataclasses.replace(settings, max_new_tokens=new_tokens)

        try:
            return self.scheduler.submit(Job(prepare, stop, on_text))
        except QueueFull as err:
            logger.warning("refused a request: %s", err)
            raise ApiError(
                503,
                f"the server is busy: {err}; retry in {RETRY_AFTER_SECONDS} s",
                "server_busy",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None

    async def answer_unless_left(
        self, request: Request, query: str, history: Pairs, settings: GenerationSettings, max_length: int | None = None
    ) -> Answer:
        """The whole answer. A client that disconnects while it waits or generates frees its row at the next step,
        so an abandoned long answer holds up nobody."""
        stop = threading.Event()
        future = self.submit(query, history, settings, stop, max_length)
        waiting = asyncio.wrap_future(future)
        while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if await request.is_disconnected():
                stop.set()
                future.cancel()  # not begun yet: the worker skips it
                logger.info("a client left before its answer was complete; its generation is stopped")
                break
        try:
            return await waiting
        except asyncio.CancelledError:
            if future.cancelled():  # nobody reads this response; the status names what happened in the log
                raise ApiError(499, "the client closed the request", "client_closed_request") from None
            raise


# ---------------------------------------------------------------------------------------------------------------
# The app


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose generation stops when the response ends for any reason (a client gone included)."""

    def __init__(self, content: AsyncIterator[str], stop: threading.Event, state: dict[str, Any]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.stop, self.state = stop, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.state.get("finished"):
                logger.info(
                    "a streaming client left after %d characters; its generation is stopped", self.state["sent"]
                )
            self.stop.set()
            if future := self.state.get("future"):
                future.cancel()  # not begun yet: the worker skips it


def build_app(cfg: DictConfig, loaded: LoadedModel) -> FastAPI:
    """The API for ``loaded``; ``cfg`` is ``conf/chat.yaml`` (limits, api_key, batching, generation defaults)."""
    service = Service(cfg, loaded)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.scheduler.close(timeout=10)

    app = FastAPI(title="ptune serve", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    body_bytes = 16 * service.max_input_chars + (1 << 20)  # room for JSON escapes (\uXXXX) and message overhead
    app.add_middleware(RequestGate, key=configured_api_key(cfg), max_body_bytes=body_bytes)
    add_reference_route(app, service)

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "ptune"}
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health(request: Request) -> dict:
        if not request.state.authorized:  # a liveness probe without the key learns that the server is up, no more
            return {"status": "ok"}
        return {"status": "ok", **service.scheduler.health()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        query, history = to_query(body.messages)
        service.check_input(query, history)
        settings = service.settings(
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            field="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.model or service.model_id,
        }
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream_completion(service, query, history, settings, head, usage)
        answer = await service.answer_unless_left(request, query, history, settings)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": _usage(answer),
        }

    return app


def _usage(answer: Answer) -> dict:
    total = answer.prompt_tokens + answer.completion_tokens
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens, "total_tokens": total}


def _stream_completion(
    service: Service, query: str, history: Pairs, settings: GenerationSettings, head: dict, include_usage: bool
) -> _EventStream:
    """Queue the request now (so a full queue is a plain 503), then stream its text as the worker sends it."""
    stop = threading.Event()
    state: dict[str, Any] = {"sent": 0, "finished": False}
    extra = {"usage": None} if include_usage else {}
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item: tuple) -> None:  # called in the worker thread
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutting down): stop generating
            stop.set()

    future = service.submit(query, history, settings, stop, on_text=lambda text: put(("text", text)))
    future.add_done_callback(lambda done: put(("done", done)))
    state["future"] = future

    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        sent, held = "", None
        while True:
            kind, value = held or await items.get()
            held = None
            while kind == "text" and not items.empty():  # behind the worker: send only the newest text, one piece
                following = items.get_nowait()
                if following[0] != "text":
                    held = following
                    break
                value = following[1]
            if kind == "text":
                if value.startswith(sent):
                    if len(value) > len(sent):
                        yield chunk({"content": value[len(sent) :]})
                        sent = value
                        state["sent"] = len(sent)
                else:  # streamed text cannot be taken back; only a final re-decode can differ like this
                    logger.warning("the final answer differs from the streamed text: %r vs %r", value, sent)
                continue
            if value.cancelled():
                break
            error = value.exception()
            if error is None:
                answer = value.result()
                yield chunk({}, answer.finish_reason)
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(answer)})
            else:
                message = f"generation failed: {type(error).__name__}: {error}"
                yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
            break
        state["finished"] = True
        yield _sse("[DONE]")

    return _EventStream(events(), stop, state)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = frontend_setup("serve", sys.argv[1:] if argv is None else argv, __doc__)
    if isinstance(setup, int):
        return setup
    cfg, loaded = setup
    host = str(cfg.host or "127.0.0.1")
    port = DEFAULT_PORT if cfg.port is None else int(cfg.port)
    app = build_app(cfg, loaded)
    shown = f"[{host}]" if ":" in host else host
    logger.info("ptune serve: %s", describe(loaded))
    logger.info(
        "ptune serve: http://%s:%d  (POST / as ChatGLM2's api.py; OpenAI-compatible POST /v1/chat/completions, "
        "GET /v1/models, GET /health; batches of up to %d)%s",
        shown,
        port,
        int(cfg.max_batch_size),
        "; API key required" if configured_api_key(cfg) else "",
    )
    if not configured_api_key(cfg) and host not in LOOPBACK:
        logger.warning("ptune serve: listening on %s without api_key: anyone who can reach it can use it", host)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
