"""``POST /`` of ``ptune serve``: ChatGLM2's reference ``api.py`` request and response, so its clients keep working.

    {"prompt", "history": [[q, a], ...], "max_length", "top_p", "temperature"}
    -> {"response", "history": [..., [prompt, response]], "status": 200, "time"}

``max_length`` was the total length in the reference (prompt + answer tokens): the answer gets ``max_length`` minus
the prompt's tokens (at least 1), clamped to ``max_new_tokens_limit``, as reference clients routinely send large
totals. Left out, the answer gets ``generation.max_new_tokens``. ``temperature`` 0 means greedy.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Request
from pydantic import AfterValidator, Field, StrictInt, field_validator

from ptune.serve.protocol import Body, Text, check_temperature


class AnswerService(Protocol):
    """What this route needs of ``ptune.serve.app.Service`` (named structurally: serve.py imports this module)."""

    def check_input(self, query: str, history: list[tuple[str, str]]) -> None: ...

    def settings(self, max_new_tokens: int | None = None, field: str = "max_tokens", **request: Any) -> Any: ...

    async def answer_unless_left(
        self, request: Request, query: str, history: list[tuple[str, str]], settings: Any, max_length: int | None
    ) -> Any: ...


class ReferenceRequest(Body):
    """ChatGLM2's ``api.py`` request."""

    prompt: Text
    history: list[tuple[Text, Text]] | None = None
    max_length: StrictInt | None = Field(None, ge=1)  # total tokens, prompt included (see the module docstring)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: Annotated[float | None, AfterValidator(check_temperature)] = Field(None, ge=0)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value


def answer_tokens(max_length: int, prompt_tokens: int, limit: int) -> int:
    """New tokens for a reference ``max_length`` (prompt and answer together): what the prompt leaves, at least
    one, never more than ``limit`` (clamped, not refused)."""
    return min(limit, max(1, max_length - prompt_tokens))


def add_reference_route(app: FastAPI, service: AnswerService) -> None:
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
