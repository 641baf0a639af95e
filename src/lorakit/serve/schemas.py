"""Request and response bodies of the HTTP API, as pydantic models.

The generation routes follow OpenAI's wire format (``/v1/completions``,
``/v1/chat/completions`` and their server-sent-event chunks), so the official ``openai``
client talks to the server unchanged. Fields a client may send that lorakit does not use
(``user``, ``presence_penalty``, ...) are accepted and ignored; fields it uses are
checked here, and a bad one answers 422 naming it.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Request):
    model: str = Field(min_length=1, description="'base' or an adapter name")
    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate at most")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyRequest(_Request):
    """POST /v1/classify: one text or a list of texts."""

    model: str = Field(default="base", min_length=1)
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give at least one text")
        return texts


class AdapterLoadRequest(_Request):
    """POST /v1/adapters: load the adapter in folder ``path`` (under --adapter-root) as ``name``."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    path: str = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
