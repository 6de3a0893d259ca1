"""``ptune serve``'s HTTP layer that needs no model: one JSON error shape for every 4xx/5xx, the gate in front of
every route (API key, body size), and the OpenAI request bodies with their checks (pydantic).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}, "status"}``, so the openai client
shows them. JSON booleans and integers are strict (``"stream": "yes"`` and ``"max_tokens": true`` are 422s, not
true and 1). Text must be encodable as UTF-8: a lone surrogate (``"\\ud800"``, which JSON allows and Python's JSON
parser keeps) is a 422 here rather than a failure in the tokenizer. Every setting a row decodes with is checked
here, so a request the decoder cannot honour is refused alone, before it reaches a batch: ``temperature`` is 0
(greedy) or at least ``MIN_TEMPERATURE``, ``seed`` within what ``torch.Generator.manual_seed`` takes.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

logger = logging.getLogger("ptune.serve.app")
Pairs = list[tuple[str, str]]
# below this a positive temperature divides float32 logits into inf (1e-45 does), and sampling there is greedy in
# all but name: 0 asks for greedy. vLLM's sampler uses the same epsilon (1e-5) to treat a temperature as greedy.
MIN_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes (a signed or an unsigned 64-bit int)


class ApiError(Exception):
    """A request the server refuses, with the status and a message for the client (and headers, e.g. Retry-After)."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


class BodyTooLarge(StarletteHTTPException):
    """A body past the byte cap, found while it is read (chunked): an HTTP exception, as FastAPI lets only those
    out of body reading, with our error code."""

    code = "body_too_large"


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
        # pydantic names union members and validators in the location ("list[TextPart]", "function-after[...]");
        # the client wants the field
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and "[" not in str(x)]
        where = ".".join(loc) or "body"
        first = first or where
        parts.append(f"{where}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return 422, "; ".join(parts) or "invalid request", "invalid_request", first


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, code, param = _validation_message(exc)
        return error_response(status, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "code", None), None, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


class RequestGate:
    """ASGI middleware in front of every route: the API key (when one is set) and a cap on the body's bytes, so a
    huge body is refused before it is read into memory. ``GET /health`` is the one route let through without the
    key (a liveness probe); ``request.state.authorized`` tells it whether to show its details."""

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
        authorized = self.key is None or self._authorized(headers)
        # load balancers probe liveness without credentials: /health answers them, but only with its status
        scope.setdefault("state", {})["authorized"] = authorized
        if not authorized and not (scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")):
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
                    raise BodyTooLarge(413, too_large)
            return message

        await self.app(scope, receive_limited, send)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI request bodies


def _encodable(text: str) -> str:
    """Text the tokenizer can take: a lone surrogate (valid JSON, not Unicode text) names its position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"the text holds a lone surrogate ({text[err.start]!r} at character {err.start}), which is not Unicode "
            "text; send valid UTF-8 (a surrogate pair's halves together)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


def check_temperature(value: float | None) -> float | None:
    """0 (greedy) or at least ``MIN_TEMPERATURE``."""
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; {value} is too small to sample with")
    return value


def check_seed(value: int | None) -> int | None:
    low, high = SEED_RANGE
    if value is not None and not low <= value <= high:
        raise ValueError(f"must be between {low} and {high} (a 64-bit integer, as torch.Generator takes)")
    return value


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(Body):
    type: Literal["text"]
    text: Text


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Body):
    include_usage: StrictBool = False


class ChatCompletionRequest(Body):
    """OpenAI's chat completion request; fields not listed here are accepted and ignored."""

    model: str | None = None  # which served model answers (``ptune.serve.app.Service.model``); echoed back
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: Annotated[float | None, AfterValidator(check_temperature)] = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Annotated[StrictInt | None, AfterValidator(check_seed)] = None
    n: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
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
