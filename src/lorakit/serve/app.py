"""The HTTP routes: an OpenAI-compatible API over a :class:`~lorakit.serve.service.Service`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), ``POST /v1/classify``,
``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}``.

Errors answer in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 for a body that is not JSON or breaks a server limit, 422 for a field of the wrong
type or range (the field is named), 403 for an adapter path outside the adapter root,
404 for an unknown model (listing the available ones), 409 for a taken name.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from lorakit.errors import LorakitError
from lorakit.serve import schemas
from lorakit.serve.engine import Event
from lorakit.serve.registry import BASE, AdapterConflict, AdapterForbidden, AdapterLoadError, UnknownAdapter
from lorakit.serve.sampling import Sampler
from lorakit.serve.service import CLASSIFY, GENERATE, Service

# error class -> (HTTP status, OpenAI error type)
_STATUS = [
    (UnknownAdapter, 404, "not_found_error"),
    (AdapterConflict, 409, "conflict_error"),
    (AdapterForbidden, 403, "permission_error"),
    (AdapterLoadError, 400, "adapter_load_error"),
    (LorakitError, 400, "invalid_request_error"),
]


def _error_response(err: Exception) -> JSONResponse:
    for cls, status, kind in _STATUS:
        if isinstance(err, cls):
            param = getattr(err, "param", None)
            return JSONResponse(schemas.error_body(str(err), kind, param), status_code=status)
    return JSONResponse(schemas.error_body(f"internal error: {err}", "server_error"), status_code=500)


def _validation_response(err: RequestValidationError) -> JSONResponse:
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        detail = "; ".join(str(p.get("ctx", {}).get("error", p.get("msg"))) for p in problems)
        return JSONResponse(schemas.error_body(f"the request body is not valid JSON: {detail}",
                                               "invalid_request_error"), status_code=400)
    parts, params = [], []
    for p in problems:
        loc = [str(x) for x in p.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        params.append(field)
        parts.append(f"field '{field}': {p.get('msg')}")
    return JSONResponse(schemas.error_body("; ".join(parts), "invalid_request_error", params[0] if params else None),
                        status_code=422)


def create_app(service: Service) -> FastAPI:
    """The FastAPI application serving ``service``; the engine runs for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            # uvicorn has already waited for the responses in flight; this drains the rest.
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, err: RequestValidationError):
        return _validation_response(err)

    @app.exception_handler(LorakitError)
    async def _on_lorakit(request: Request, err: LorakitError):
        return _error_response(err)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "task": service.task,
                "adapters": len(service.registry.names()), "adapters_resident": service.registry.resident_count(),
                **service.engine.stats()}

    @app.get("/v1/models")
    async def models():
        created = schemas.now()
        data = [{"id": BASE, "object": "model", "created": created, "owned_by": "lorakit", "parent": None,
                 "root": service.model_name}]
        for a in service.registry.describe():
            data.append({"id": a["name"], "object": "model", "created": created, "owned_by": "lorakit",
                         "parent": BASE, "root": service.model_name, "resident": a["resident"],
                         "loads": a["loads"]})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest):
        service.require_task(GENERATE)
        ids = service.encode_prompt(body.prompt)
        return await _generate(service, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatRequest):
        service.require_task(GENERATE)
        ids = service.encode_chat([m.model_dump() for m in body.messages])
        return await _generate(service, body, ids, chat=True)

    @app.post("/v1/classify")
    async def classify(body: schemas.ClassifyRequest):
        service.require_task(CLASSIFY)
        results = await service.classify(body.input, body.model)
        return {"object": "list", "model": body.model, "data": results}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: schemas.AdapterLoadRequest):
        return await service.add_adapter(body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        return await service.remove_adapter(name)

    return app


async def _generate(service: Service, body: schemas._Sampling, ids: list[int], chat: bool):
    if body.max_tokens is None:  # OpenAI's defaults: 16 for completions, "as long as fits" for chat
        room = service.limits.context - len(ids)
        max_tokens = max(1, min(service.limits.max_tokens if chat else 16, room))
    else:
        max_tokens = body.max_tokens
    max_tokens = service.check_max_tokens(ids, max_tokens)
    sampler = Sampler(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    request, events = service.submit(ids, body.model, max_tokens, sampler, body.stop)
    reply = _ChatFormat(body.model) if chat else _CompletionFormat(body.model)
    try:
        first = await events.get()
    except asyncio.CancelledError:
        request.cancel()
        raise
    if first.kind == "error":
        return _error_response(first.error)
    if body.stream:
        return StreamingResponse(_sse(request, first, events, reply), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    pieces, event = [], first
    try:
        while event.kind == "text":
            pieces.append(event.text)
            event = await events.get()
    except asyncio.CancelledError:
        request.cancel()
        raise
    if event.kind == "error":
        return _error_response(event.error)
    return reply.whole("".join(pieces), event)


async def _sse(request, first: Event, events: asyncio.Queue, reply):
    """Server-sent events: a chunk per piece of text, a last chunk with the finish reason, [DONE]."""
    try:
        head = reply.head()
        if head is not None:
            yield _data(head)
        event = first
        while True:
            if event.kind == "text":
                yield _data(reply.chunk(event.text))
            elif event.kind == "done":
                yield _data(reply.chunk(None, event.finish_reason))
                break
            else:
                yield _data(json.loads(_error_response(event.error).body))
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()  # a no-op when finished; frees the row when the client went away


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _CompletionFormat:
    """OpenAI's ``text_completion`` objects, whole and streamed."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, schemas.new_id("cmpl"), schemas.now()

    def _base(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def head(self):
        return None

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._base(), "choices": [choice]}

    def whole(self, text: str, done: Event) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return {**self._base(), "choices": [choice], "usage": schemas.usage(done.prompt_tokens, done.completion_tokens)}


class _ChatFormat:
    """OpenAI's ``chat.completion`` and ``chat.completion.chunk`` objects."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, schemas.new_id("chatcmpl"), schemas.now()

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def head(self) -> dict:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def whole(self, text: str, done: Event) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": done.finish_reason}
        return {**self._base("chat.completion"), "choices": [choice],
                "usage": schemas.usage(done.prompt_tokens, done.completion_tokens)}
