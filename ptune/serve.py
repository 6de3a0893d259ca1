"""``ptune serve``: an HTTP API over the one generation path (``ptune.generation``), FastAPI under uvicorn.

    ptune serve checkpoint=outputs/DATE/TIME/checkpoint-200 [port=8000] [host=0.0.0.0] [api_key=SECRET]

Endpoints:
  POST /                     ChatGLM2's reference ``api.py``, so its clients keep working:
                             {"prompt", "history": [[q, a], ...], "max_length", "top_p", "temperature"}
                             -> {"response", "history": [..., [prompt, response]], "status": 200, "time"}
  POST /v1/chat/completions  OpenAI-compatible chat; ``"stream": true`` sends server-sent events
  GET  /v1/models            the one model served: "<base folder>/<checkpoint folder>" (or the base's name)

Choices:
- System messages (OpenAI ``system`` or ``developer`` roles) may only open the conversation; ChatGLM2's prompt
  format has no system turn, so their text goes in front of the first user message (blank line between). The
  prompt of a growing conversation then keeps the same beginning. After them, user and assistant messages
  alternate and the last one is the user's query; anything else is a 422 saying what is wrong.
- ``max_length`` (``POST /``) was the total length in the reference (prompt + answer tokens): the answer gets
  ``max_length`` minus the prompt's tokens (at least 1), clamped to ``max_new_tokens_limit``, as reference
  clients routinely send large totals. Left out, the answer gets ``generation.max_new_tokens``.
- ``max_tokens`` / ``max_completion_tokens`` (``/v1``) over ``max_new_tokens_limit`` is a 422 (as OpenAI refuses a
  too-large ``max_tokens``), not silently cut. ``temperature`` 0 means greedy; a positive one turns sampling on
  (``ptune.frontend.generation_settings``); left out, ``conf/chat.yaml``'s ``generation`` decides.
- Prompt plus history (system text included) longer than ``max_input_chars`` characters is a 413; wrong types, an
  empty prompt, empty messages are 422, a body that is not JSON is 400. Every error is JSON:
  ``{"error": {"message", "type", "param", "code"}, "status"}`` (OpenAI's shape; the openai client shows it).
- With ``api_key`` set, every request needs ``Authorization: Bearer <api_key>`` (401 otherwise, compared in
  constant time), the docs pages included.

Concurrency: the model is not thread-safe. One worker thread owns it and runs jobs from one FIFO queue, one at a
time: answers never mix and nothing is dropped. The event loop only waits for results (``asyncio.wrap_future``), so
it keeps answering (``/v1/models``, validation errors) while a long answer is generated. A streaming request is one
job for its whole generation; its text reaches the event loop through an ``asyncio.Queue``. When a client
disconnects (streaming: its response stops; otherwise checked every ``DISCONNECT_POLL_SECONDS`` while it waits), its
stop event is set: generation ends at the next token and the worker takes the next job; a job whose client left
before it started is skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import queue
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from ptune.frontend import compose_frontend_config, describe, generation_settings, load_model
from ptune.generation import GenerationSettings, decode, encode_prompt, generate_ids, stream_answer
from ptune.hydra_setup import route_library_logs
from ptune.loading import LoadedModel

DEFAULT_PORT = 8000
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting non-streaming request checks that its client is still there
logger = logging.getLogger(__name__)
Pairs = list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------------------------
# Errors: one JSON shape for every 4xx/5xx


class ApiError(Exception):
    """A request the server refuses, with the status and a message for the client."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(status: int, message: str, code: str | None = None, param: str | None = None, **kw) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}, "status": status}
    return JSONResponse(body, status_code=status, **kw)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"the request body is not valid JSON ({detail})", "invalid_json", None
    if isinstance(exc.body, bytes | bytearray):  # FastAPI parses JSON only when the client says it is JSON
        return 422, "send the body as a JSON object with 'Content-Type: application/json'", "invalid_request", None
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        parts.append(f"{where}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return 422, "; ".join(parts) or "invalid request", "invalid_request", first


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, code, param = _validation_message(exc)
        return error_response(status, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


class RequestGate:
    """ASGI middleware in front of every route: the API key (when one is set) and a cap on the body's bytes, so a
    huge body is refused before it is read into memory."""

    def __init__(self, app: ASGIApp, key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = key.encode() if key is not None else None
        self.max_body_bytes = max_body_bytes

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest always runs, whatever the scheme, so timing tells nothing about the key
        matches = secrets.compare_digest(token.strip(), self.key)
        return matches and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.key is not None and not self._authorized(headers):
            message = "missing or wrong API key: send 'Authorization: Bearer <api_key>'"
            response = error_response(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        too_large = f"the request body is over {self.max_body_bytes} bytes, more than this server reads"
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await error_response(413, too_large, "body_too_large")(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> AsgiMessage:  # a body without Content-Length (chunked) is counted as it comes
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise StarletteHTTPException(413, too_large)  # FastAPI lets HTTP exceptions through
            return message

        await self.app(scope, receive_limited, send)


# ---------------------------------------------------------------------------------------------------------------
# Request bodies (pydantic): the checks that need no config


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ReferenceRequest(_Body):
    """ChatGLM2's ``api.py`` request."""

    prompt: str
    history: list[tuple[str, str]] | None = None
    max_length: int | None = Field(None, ge=1)  # total tokens, prompt included (see the module docstring)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float | None = Field(None, ge=0)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """OpenAI's chat completion request; fields not listed here are accepted and ignored."""

    model: str | None = None  # accepted and echoed: this server has one model
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported (one answer per request)")
        return value

    @field_validator("stop")
    @classmethod
    def _no_stop_sequences(cls, value: str | list[str] | None) -> None:
        if value:
            raise ValueError("stop sequences are not supported; the answer ends at the model's end token")
        return None


def to_query(messages: Sequence[Message]) -> tuple[str, Pairs]:
    """``(query, history)`` from chat messages: leading system messages go in front of the first user message, then
    user/assistant pairs are the history and the last user message is the query."""
    start = 0
    while start < len(messages) and messages[start].role in ("system", "developer"):
        start += 1
    system = "\n".join(m.text for m in messages[:start] if m.text.strip())
    turns = messages[start:]
    if not turns:
        raise ApiError(422, "messages need a user message after the system message(s)", "invalid_messages", "messages")
    for k, message in enumerate(turns):
        wanted = "user" if k % 2 == 0 else "assistant"
        if message.role != wanted:
            raise ApiError(
                422,
                f"messages[{start + k}] has role {message.role} where a {wanted} message belongs: system messages "
                "may only come first, then user and assistant messages alternate, ending with a user message",
                "invalid_messages",
                f"messages.{start + k}.role",
            )
    if len(turns) % 2 == 0:
        raise ApiError(422, "the last message must be a user message", "invalid_messages", "messages")
    query = turns[-1].text
    if not query.strip():
        raise ApiError(422, "the last user message is empty", "invalid_messages", f"messages.{len(messages) - 1}")
    history = [(turns[k].text, turns[k + 1].text) for k in range(0, len(turns) - 1, 2)]
    if system:
        if history:
            history[0] = (f"{system}\n\n{history[0][0]}", history[0][1])
        else:
            query = f"{system}\n\n{query}"
    return query, history


# ---------------------------------------------------------------------------------------------------------------
# The model: one worker thread, one FIFO queue


class ModelWorker:
    """The one thread that uses the model: jobs run one at a time in arrival order; the event loop awaits them."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="ptune-model", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():  # its client left while it waited
                continue
            try:
                future.set_result(job())
            except BaseException as err:  # handed to the waiting request
                future.set_exception(err)

    def submit(self, job: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


@dataclasses.dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token) or "length" (max_new_tokens reached)


def finish_reason(ids: Sequence[int], settings: GenerationSettings) -> str:
    """OpenAI's finish_reason: "length" when the answer used all its new tokens, else "stop"."""
    return "length" if len(ids) >= settings.max_new_tokens else "stop"


def api_key(cfg: DictConfig) -> str | None:
    """The configured key, or None for an open server (``api_key=null`` or empty)."""
    return None if cfg.api_key is None or str(cfg.api_key) == "" else str(cfg.api_key)


def model_id(loaded: LoadedModel) -> str:
    base = Path(loaded.base_path).name
    return f"{base}/{Path(loaded.checkpoint).name}" if loaded.checkpoint else base


class Service:
    """What the endpoints share: the config, the loaded model and its worker."""

    def __init__(self, cfg: DictConfig, loaded: LoadedModel) -> None:
        self.cfg, self.loaded = cfg, loaded
        self.limit = int(cfg.max_new_tokens_limit)
        self.max_input_chars = int(cfg.max_input_chars)
        self.model_id = model_id(loaded)
        self.created = int(time.time())
        self.worker = ModelWorker()

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

    async def answer_unless_left(
        self, request: Request, query: str, history: Pairs, settings: GenerationSettings, max_length: int | None = None
    ) -> Answer:
        """``answer`` on the worker. A client that disconnects while it waits or generates stops its job, so an
        abandoned long answer does not hold up the requests queued behind it."""
        stop = threading.Event()
        future = self.worker.submit(functools.partial(self.answer, query, history, settings, max_length, stop))
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

    # -- run in the worker thread only (the tokenizer and the model are used there, nowhere else) --

    def answer(
        self,
        query: str,
        history: Pairs,
        settings: GenerationSettings,
        max_length: int | None = None,
        stop: threading.Event | None = None,
    ) -> Answer:
        if stop is not None and stop.is_set():  # the client left while the job waited
            return Answer("", 0, 0, "stop")
        prompt = encode_prompt(self.loaded, query, history)
        if max_length is not None:
            # ChatGLM2's api.py: max_length counted prompt and answer together. The answer gets what the prompt
            # leaves, at least one token, and never more than max_new_tokens_limit (clamped, not refused).
            new = min(self.limit, max(1, max_length - len(prompt)))
            settings = dataclasses.replace(settings, max_new_tokens=new)
        ids = next(generate_ids(self.loaded, [prompt], settings, 1, stop=stop))[1]
        return Answer(decode(self.loaded.tokenizer, ids), len(prompt), len(ids), finish_reason(ids, settings))

    def stream(
        self, query: str, history: Pairs, settings: GenerationSettings, stop: threading.Event, emit: Callable
    ) -> None:
        """Send ``("text", whole answer so far)`` items, then ``("done", Answer)``, through ``emit``."""
        if stop.is_set():  # the client left while the job waited
            return
        prompt_tokens = len(encode_prompt(self.loaded, query, history))
        text, ids = "", []
        for text in stream_answer(self.loaded, query, history, settings, stop, answer_ids=ids):
            emit(("text", text))
        emit(("done", Answer(text, prompt_tokens, len(ids), finish_reason(ids, settings))))


# ---------------------------------------------------------------------------------------------------------------
# The app


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose generation stops when the response ends for any reason (a client gone included)."""

    def __init__(self, content: AsyncIterator[str], stop: threading.Event, state: dict) -> None:
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
    """The API for ``loaded``; ``cfg`` is ``conf/chat.yaml`` (limits, api_key, generation defaults)."""
    service = Service(cfg, loaded)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.worker.close(timeout=10)

    app = FastAPI(title="ptune serve", lifespan=lifespan)
    app.state.service = service
    _install_error_handlers(app)
    body_bytes = 16 * service.max_input_chars + (1 << 20)  # room for JSON escapes (\uXXXX) and message overhead
    app.add_middleware(RequestGate, key=api_key(cfg), max_body_bytes=body_bytes)

    @app.post("/")
    async def reference_chat(body: ReferenceRequest, request: Request) -> dict:
        history = [(q, a) for q, a in body.history or []]
        service.check_input(body.prompt, history)
        settings = service.settings(top_p=body.top_p, temperature=body.temperature)
        answer = await service.answer_unless_left(request, body.prompt, history, settings, body.max_length)
        return {
            "response": answer.text,
            "history": [[q, a] for q, a in history] + [[body.prompt, answer.text]],
            "status": 200,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "ptune"}
        return {"object": "list", "data": [entry]}

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
    stop = threading.Event()
    state: dict[str, Any] = {"sent": 0, "finished": False}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    async def events() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def emit(item: tuple) -> None:  # called in the worker thread
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutting down): stop generating
                stop.set()

        def job() -> None:
            try:
                service.stream(query, history, settings, stop, emit)
            except Exception as err:
                logger.exception("streaming generation failed")
                emit(("error", err))

        state["future"] = service.worker.submit(job)
        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        while True:
            kind, value = await items.get()
            if kind == "text":
                if value.startswith(sent):
                    if len(value) > len(sent):
                        yield chunk({"content": value[len(sent) :]})
                        sent = value
                        state["sent"] = len(sent)
                else:  # streamed text cannot be taken back; only a final re-decode can differ like this
                    logger.warning("the final answer differs from the streamed text: %r vs %r", value, sent)
            elif kind == "done":
                yield chunk({}, value.finish_reason)
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)})
                break
            else:
                message = f"generation failed: {type(value).__name__}: {value}"
                yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                break
        state["finished"] = True
        yield _sse("[DONE]")

    return _EventStream(events(), stop, state)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = compose_frontend_config(list(sys.argv[1:] if argv is None else argv))
    except (HydraException, OmegaConfBaseException) as err:
        print(f"ptune serve: {err}", file=sys.stderr)
        return 2
    route_library_logs()
    try:
        loaded = load_model(cfg)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"ptune serve: {err}", file=sys.stderr)
        return 1
    host = str(cfg.host or "127.0.0.1")
    port = DEFAULT_PORT if cfg.port is None else int(cfg.port)
    app = build_app(cfg, loaded)
    shown = f"[{host}]" if ":" in host else host
    logger.info("ptune serve: %s", describe(loaded))
    logger.info(
        "ptune serve: http://%s:%d  (POST / as ChatGLM2's api.py; OpenAI-compatible POST /v1/chat/completions, "
        "GET /v1/models)%s",
        shown,
        port,
        "; API key required" if api_key(cfg) else "",
    )
    if not api_key(cfg) and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("ptune serve: listening on %s without api_key: anyone who can reach it can use it", host)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
