"""``ptune serve``: an HTTP API over the one generation path (``ptune.inference.generation``), FastAPI under uvicorn,
with the model in an engine process of its own (``ptune.serve.engine``).

    ptune serve checkpoint=outputs/DATE/TIME/checkpoint-200 [port=8000] [host=0.0.0.0] [api_key=SECRET]
    ptune serve checkpoint=A,B,C        several checkpoints of one base (or checkpoint=FOLDER: those inside it)

Endpoints:
  POST /                     ChatGLM2's reference ``api.py`` shape, so its clients keep working (``serve.reference``)
  POST /v1/chat/completions  OpenAI-compatible chat; ``"stream": true`` sends server-sent events
  GET  /v1/models            the models served: each checkpoint by its folder's name, then the bare base as
                             ``base_name`` (``ptune.serve.models``); a request's ``model`` picks one
  GET  /health               engine alive, queue length, batch in flight (slots in use), the limits, the largest
                             batch so far, the prefixes loaded (their names)

The modules: this one (the HTTP process: the service, the ``/v1`` and ``/health`` routes, streaming, the command
line); ``serve.protocol`` (error shape, API key and body-size gate, OpenAI request bodies); ``serve.reference``
(``POST /``); ``serve.client`` (this process's side of the engine); ``serve.ipc`` (the sockets and messages);
``serve.engine`` and ``serve.scheduler`` (the engine process: the model, the busy loop, continuous batching).
This process never imports torch.

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
- A dead engine (killed, out of memory) is not restarted: requests in flight and new ones get a 503 saying so,
  ``/health`` answers 503 with ``"status": "engine_dead"``, and after ``ENGINE_DEAD_EXIT_SECONDS`` the server exits
  with status 1. Why not restart it here: reloading the model takes as long as a fresh start (minutes on a 6B),
  requests would get 503s meanwhile anyway, and a crash that repeats (out of memory at load) would loop hidden;
  a supervisor (systemd ``Restart=``, Kubernetes) restarts the whole server with backoff and sees the failure.

Concurrency: the engine decodes the requests in flight together, up to ``max_batch_size``, a new one joining at
the next step (its prompt prefilled inside that step's forward, in chunks of at most ``step_tokens`` tokens a
step); each gets its own settings and its own tokens. More than ``max_queue`` requests waiting for a slot
get a 503 with ``Retry-After``. The event loop only waits for results, so it keeps answering (``/v1/models``,
``/health``, validation errors) while answers are generated. A streaming request's text reaches the event loop
through an ``asyncio.Queue``. When a client disconnects (streaming: its response stops; otherwise checked every
``DISCONNECT_POLL_SECONDS`` while it waits), the engine is told and its row leaves the batch at the next step;
the other rows go on undisturbed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig
from starlette.types import Receive, Scope, Send

from ptune.frontends.config import compose_chat_config
from ptune.frontends.start import LOOPBACK, configured_api_key, frontend_config
from ptune.serve.client import Answer, EngineClient, EngineDead, EngineFailed, QueueFull, RequestFailed
from ptune.serve.protocol import ApiError, ChatCompletionRequest, Pairs, RequestGate, install_error_handlers, to_query
from ptune.serve.reference import add_reference_route

DEFAULT_PORT = 8000
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting non-streaming request checks that its client is still there
RETRY_AFTER_SECONDS = 1  # a full queue drains in about an answer's time on the built-in model; clients back off
ENGINE_DEAD_EXIT_SECONDS = 3  # after the engine died: time for in-flight clients and /health to hear it, then exit 1
logger = logging.getLogger(__name__)


class Ticket:
    """A request handed to the engine: its answer's future, and ``stop`` to tell the engine its client left."""

    def __init__(self, engine: EngineClient, job_id: str, future: concurrent.futures.Future) -> None:
        self.engine, self.job_id, self.future = engine, job_id, future

    def stop(self) -> None:
        self.future.cancel()  # whatever the engine sends for it now is dropped
        self.engine.cancel(self.job_id)


class Service:
    """What the endpoints share: the config and the engine that runs the model."""

    def __init__(self, cfg: DictConfig, engine: EngineClient) -> None:
        self.cfg, self.engine = cfg, engine
        self.limit = int(cfg.max_new_tokens_limit)
        self.max_input_chars = int(cfg.max_input_chars)
        self.models, self.base_name = engine.models, str(cfg.base_name)
        self.created = int(time.time())

    def model(self, requested: str | None) -> str:
        """The served name a request's ``model`` picks: itself if served; left out, the default (the first
        checkpoint). A server of one checkpoint answers any other name with it, as OpenAI-style clients send
        names of their own; with several, an unknown name is a 404 listing them."""
        if requested is None or requested in self.models:
            return requested or self.models[0]
        if len([m for m in self.models if m != self.base_name]) <= 1:
            return self.models[0]
        raise ApiError(
            404, f"model {requested!r} is not served here; choose one of {self.models}", "model_not_found", "model"
        )

    def check_input(self, query: str, history: Pairs) -> None:
        chars = len(query) + sum(len(q) + len(a) for q, a in history)
        if chars > self.max_input_chars:
            raise ApiError(
                413,
                f"the input is {chars} characters (prompt and history); this server takes at most "
                f"{self.max_input_chars} (max_input_chars)",
                "input_too_long",
            )

    def settings(self, max_new_tokens: int | None = None, field: str = "max_tokens", **request: Any) -> dict:
        """The request's generation settings (the engine applies them to ``generation``); asking for more than
        ``max_new_tokens_limit`` new tokens is a 422."""
        if max_new_tokens is not None and max_new_tokens > self.limit:
            raise ApiError(
                422,
                f"{field}={max_new_tokens} is more than this server's limit of {self.limit} new tokens "
                "(max_new_tokens_limit)",
                "max_tokens_too_large",
                field,
            )
        return {"max_new_tokens": max_new_tokens, **request}

    def submit(
        self,
        query: str,
        history: Pairs,
        settings: dict,
        max_length: int | None = None,
        on_text: Callable[[str], None] | None = None,
        model: str | None = None,
    ) -> Ticket:
        """Hand a request for ``model`` (a served name; None: the default) to the engine; a full queue is a 503
        with ``Retry-After``, a dead engine a 503."""
        request = {
            "model": model or self.models[0],
            "query": query,
            "history": [list(pair) for pair in history],
            "settings": settings,
            "max_length": max_length,
            "stream": on_text is not None,
        }
        try:
            return Ticket(self.engine, *self.engine.submit(request, on_text))
        except QueueFull as err:
            logger.warning("refused a request: %s", err)
            raise ApiError(
                503,
                f"the server is busy: {err}; retry in {RETRY_AFTER_SECONDS} s",
                "server_busy",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except EngineDead as err:
            raise ApiError(503, str(err), "engine_dead") from None

    async def answer_unless_left(
        self,
        request: Request,
        query: str,
        history: Pairs,
        settings: dict,
        max_length: int | None = None,
        model: str | None = None,
    ) -> Answer:
        """The whole answer. A client that disconnects while it waits or generates frees its row at the next step,
        so an abandoned long answer holds up nobody."""
        ticket = self.submit(query, history, settings, max_length, model=model)
        waiting = asyncio.wrap_future(ticket.future)
        while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if await request.is_disconnected():
                ticket.stop()
                logger.info("a client left before its answer was complete; its generation is stopped")
                break
        try:
            return await waiting
        except asyncio.CancelledError:
            if ticket.future.cancelled():  # nobody reads this response; the status names what happened in the log
                raise ApiError(499, "the client closed the request", "client_closed_request") from None
            raise
        except EngineDead as err:
            raise ApiError(503, str(err), "engine_dead") from None
        except RequestFailed as err:
            raise ApiError(500, f"generation failed: {err}", "generation_failed") from None


# ---------------------------------------------------------------------------------------------------------------
# The app


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose generation stops when the response ends for any reason (a client gone included)."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket, state: dict[str, Any]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.ticket, self.state = ticket, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.state.get("finished"):
                logger.info(
                    "a streaming client left after %d characters; its generation is stopped", self.state["sent"]
                )
                self.ticket.stop()


def build_app(cfg: DictConfig, engine: EngineClient, close_engine: bool = False) -> FastAPI:
    """The API over ``engine``; ``cfg`` is ``conf/chat.yaml`` (limits, api_key, batching, generation defaults).
    ``close_engine``: the server's shutdown closes the engine (uvicorn re-raises a SIGTERM once it has shut down,
    so code after ``Server.run`` never runs then); otherwise the caller closes it."""
    service = Service(cfg, engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if close_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="ptune serve", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    body_bytes = 16 * service.max_input_chars + (1 << 20)  # room for JSON escapes (\uXXXX) and message overhead
    app.add_middleware(RequestGate, key=configured_api_key(cfg), max_body_bytes=body_bytes)
    add_reference_route(app, service)

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"object": "model", "created": service.created, "owned_by": "ptune"}
        return {"object": "list", "data": [{"id": m, **entry} for m in service.models]}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        details = service.engine.health()
        alive = details["engine"] == "alive"
        status = {"status": "ok" if alive else "engine_dead"}
        if request.state.authorized:  # a liveness probe without the key learns whether the server is up, no more
            status.update(details)
        return JSONResponse(status, status_code=200 if alive else 503)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = service.model(body.model)
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
            "model": body.model or service.model(None),
        }
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream_completion(service, query, history, settings, head, usage, model)
        answer = await service.answer_unless_left(request, query, history, settings, model=model)
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
    service: Service, query: str, history: Pairs, settings: dict, head: dict, include_usage: bool, model: str
) -> _EventStream:
    """Queue the request now (so a full queue is a plain 503), then stream its text as the engine sends it."""
    state: dict[str, Any] = {"sent": 0, "finished": False}
    extra = {"usage": None} if include_usage else {}
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item: tuple) -> None:  # called in the engine client's receiver thread
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutting down): stop generating
            ticket.stop()

    ticket = service.submit(query, history, settings, on_text=lambda text: put(("text", text)), model=model)
    ticket.future.add_done_callback(lambda done: put(("done", done)))

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
                dead = isinstance(error, EngineDead)
                message = str(error) if dead else f"generation failed: {error}"
                code = "engine_dead" if dead else "generation_failed"
                yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
            break
        state["finished"] = True
        yield _sse("[DONE]")

    return _EventStream(events(), ticket, state)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """Start the engine process, then serve HTTP until stopped: 0, or 1 when the engine died (2: a bad option)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = [_one_string(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    cfg = frontend_config("serve", argv, __doc__, compose_chat_config)
    if isinstance(cfg, int):
        return cfg
    servers: list[uvicorn.Server] = []

    def exit_soon(_code: int) -> None:  # in the client's watcher thread: let clients and /health hear it first
        time.sleep(ENGINE_DEAD_EXIT_SECONDS)
        for server in servers:
            server.should_exit = True

    try:
        engine = EngineClient(cfg, on_dead=exit_soon)  # checks the config and loads the model, in its process
    except EngineFailed as err:
        print(f"ptune serve: {err}", file=sys.stderr)
        return err.code
    except ValueError as err:  # a setting out of range (max_batch_size, max_queue, step_tokens)
        print(f"ptune serve: {err}", file=sys.stderr)
        return 2
    try:
        host = str(cfg.host or "127.0.0.1")
        port = DEFAULT_PORT if cfg.port is None else int(cfg.port)
        app = build_app(cfg, engine, close_engine=True)
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
        )
        servers.append(server)
        shown = f"[{host}]" if ":" in host else host
        logger.info("ptune serve: %s (engine process %d)", engine.ready["describe"], engine.process.pid)
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
        if not engine.died:
            server.run()
    finally:
        engine.close()
    if engine.died:
        print(f"ptune serve: {engine.dead_message()}", file=sys.stderr)
        return 1
    return 0


def _one_string(arg: str) -> str:
    """``checkpoint=A,B,C`` as one string (Hydra reads a bare comma list as a sweep); the engine splits it."""
    key, _, value = arg.partition("=")
    if key == "checkpoint" and "," in value and value[:1] not in "'\"[":
        return f"checkpoint='{value}'"
    return arg


if __name__ == "__main__":
    sys.exit(main())
