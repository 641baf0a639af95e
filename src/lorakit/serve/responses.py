"""Errors as HTTP answers in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Each error class has one status: 400 for a request that breaks a server limit or names
an unloadable adapter, 401 without the right key, 403 for a path outside the adapter
root (or a key that may not use the route), 404 for an unknown model, 409 for a taken
name, 413 for a body over ``--max-body-bytes``, 422 for a field of the wrong type or
range (the field is named) or an adapter that produced non-finite values, 429 when
``--max-queue`` requests already wait (with ``Retry-After: 1``), 504 past
``--request-timeout``. Anything else is a 500 whose message says only "internal error";
the details go to the server log.
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lorakit.errors import LorakitError
from lorakit.serve import schemas
from lorakit.serve.confine import PathForbidden
from lorakit.serve.registry import AdapterConflict, AdapterLoadError, UnknownAdapter
from lorakit.serve.sampling import NonFiniteLogits
from lorakit.serve.service import QueueFull

log = logging.getLogger("lorakit.serve")


class RequestTimeout(LorakitError):
    """A request ran past ``--request-timeout`` (HTTP 504)."""


class Unauthorized(LorakitError):
    """No API key, or a wrong one (HTTP 401)."""


# error class -> (HTTP status, OpenAI error type, code); the first match wins
STATUS = [
    (UnknownAdapter, 404, "not_found_error", "model_not_found"),
    (AdapterConflict, 409, "conflict_error", None),
    (PathForbidden, 403, "permission_error", None),
    (AdapterLoadError, 400, "adapter_load_error", None),
    (QueueFull, 429, "rate_limit_error", "rate_limit_exceeded"),
    (NonFiniteLogits, 422, "adapter_error", "non_finite_logits"),
    (RequestTimeout, 504, "timeout_error", "request_timeout"),
    (Unauthorized, 401, "invalid_request_error", "invalid_api_key"),
    (LorakitError, 400, "invalid_request_error", None),
]


def error_status(err: Exception) -> int:
    return next((status for cls, status, _, _ in STATUS if isinstance(err, cls)), 500)


def error_response(err: Exception) -> JSONResponse:
    """The answer to ``err``: its status and OpenAI's error shape."""
    for cls, status, kind, code in STATUS:
        if isinstance(err, cls):
            headers = {"Retry-After": "1"} if status == 429 else None
            if status == 401:
                headers = {"WWW-Authenticate": "Bearer"}
            param = getattr(err, "param", None)
            if status == 404 and param is None:
                param = "model"
            return JSONResponse(schemas.error_body(str(err), kind, param, code), status_code=status, headers=headers)
    log.error("internal error", exc_info=err)
    return JSONResponse(schemas.error_body("internal error; the server log has the details", "server_error"),
                        status_code=500)


def message_response(message: str, status: int, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(schemas.error_body(message, kind, None, code), status_code=status)


def validation_response(err: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON, else 422 naming the first bad field."""
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        detail = "; ".join(str(p.get("ctx", {}).get("error", p.get("msg"))) for p in problems)
        return JSONResponse(schemas.error_body(f"the request body is not valid JSON: {detail}",
                                               "invalid_request_error"), status_code=400)
    by_field: dict[str, list[str]] = {}
    for p in problems:
        # a field of several types (prompt: a text or token ids) reports one error per type, each
        # under the type's tag (``function-after[...]``, ``list[int]``); the field's name is the rest
        loc = [str(x) for x in p.get("loc", ()) if x != "body" and not _type_tag(x)]
        messages = by_field.setdefault(".".join(loc), [])
        message = str(p.get("msg")).removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        if message not in messages:
            messages.append(message)
    parts = [f"field '{field}': {'; or '.join(messages)}" if field else "; or ".join(messages)  # a check of the
             for field, messages in by_field.items()]                                          # whole body
    return JSONResponse(schemas.error_body("; ".join(parts), "invalid_request_error", next(iter(by_field), None) or None),
                        status_code=422)


def _type_tag(part) -> bool:
    """Whether a pydantic error location part names a member type of a union, not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))
