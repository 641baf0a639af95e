"""The HTTP application: an OpenAI-compatible API over a :class:`~lorakit.serve.service.Service`.

Routes: ``GET /health``, ``GET /metrics`` and vLLM's ``GET /version`` (open), ``GET /v1/models``
(and one model's card, ``GET /v1/models/{id}``; each with vLLM's ``max_model_len``),
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``),
``POST /v1/classify`` (also at vLLM's ``POST /classify``), ``POST /v1/score`` and ``POST /v1/rerank``
(:mod:`lorakit.serve.score`; also at vLLM's paths), the adapter routes of :mod:`lorakit.serve.admin`
(``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, vLLM's
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``) and vLLM's
``POST /tokenize`` and ``POST /detokenize`` (:mod:`lorakit.serve.tokens`).

Around the routes, outermost first: :class:`VllmPathsMiddleware` (vLLM's paths to lorakit's),
:class:`~lorakit.serve.metrics.MetricsMiddleware`
(counts every answer), :class:`~lorakit.serve.auth.AccessMiddleware` (``Host`` header
and API keys), :class:`~lorakit.serve.limits.BodyLimitMiddleware` (413 past
``--max-body-bytes``, 429 while the queue is full). Every error answers in OpenAI's shape
(:mod:`lorakit.serve.responses`).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from lorakit import __version__
from lorakit.errors import LorakitError
from lorakit.serve import admin, formats, schemas, score, tokens
from lorakit.serve.auth import Access, AccessMiddleware
from lorakit.serve.generate import complete
from lorakit.serve.limits import BodyLimitMiddleware
from lorakit.serve.metrics import Metrics, MetricsMiddleware
from lorakit.serve.registry import BASE
from lorakit.serve.responses import error_response, message_response, validation_response
from lorakit.serve.service import CLASSIFY, Service


#: vLLM's paths for routes lorakit serves under /v1/
VLLM_PATHS = {"/classify": "/v1/classify", "/score": "/v1/score", "/rerank": "/v1/rerank", "/v2/rerank": "/v1/rerank"}


class VllmPathsMiddleware:
    """Outermost: a request to one of vLLM's paths (:data:`VLLM_PATHS`) is taken as one to lorakit's
    route of the same body, so keys, queue limits, metrics and routing all see one path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") in VLLM_PATHS:
            path = VLLM_PATHS[scope["path"]]
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def create_app(service: Service, access: Access | None = None) -> FastAPI:
    """The FastAPI application serving ``service``; the engine runs for the app's lifetime.

    ``access``: API keys and accepted ``Host`` names (default: none, any host; the
    ``lorakit serve`` command and :func:`lorakit.serve.run` check the host).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            # uvicorn has already waited for the responses in flight; this drains the rest.
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    metrics = Metrics(service)
    app.state.service, app.state.metrics = service, metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.limits.max_body_bytes, queue_full=service.queue_full)
    app.add_middleware(AccessMiddleware, access=access or Access())
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(VllmPathsMiddleware)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, err: RequestValidationError):
        return validation_response(err)

    @app.exception_handler(LorakitError)
    async def _on_lorakit(request: Request, err: LorakitError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        response = message_response(str(err.detail), err.status_code, kind)
        for key, value in (err.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def _on_anything(request: Request, err: Exception):
        return error_response(err)  # a 500 in OpenAI's shape; the details go to the log

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "task": service.task,
                "adapters": len(service.registry.names()), "adapters_resident": service.registry.resident_count(),
                **service.engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version():  # vLLM's
        return {"version": __version__}

    def model_cards() -> list[dict]:
        created, context = schemas.now(), service.limits.context  # max_model_len: as vLLM's cards give it
        data = [{"id": BASE, "object": "model", "created": created, "owned_by": "lorakit", "parent": None,
                 "root": service.model_name, "max_model_len": context}]
        for a in service.registry.describe():
            data.append({"id": a["name"], "object": "model", "created": created, "owned_by": "lorakit",
                         "parent": BASE, "root": service.model_name, "max_model_len": context,
                         "resident": a["resident"], "loads": a["loads"]})
        return data

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):  # OpenAI's "retrieve model"; 404 in its shape for an unknown one
        card = next((c for c in model_cards() if c["id"] == model_id), None)
        if card is None:
            return error_response(service.registry.unknown(model_id))
        return card

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request):
        return await complete(service, metrics, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatRequest, request: Request):
        return await complete(service, metrics, request, body, chat=True)

    @app.post("/v1/classify")
    async def classify(body: schemas.ClassifyRequest, request: Request):
        request.state.adapter = body.model
        service.require_task(CLASSIFY)
        await service.ensure_model(body.model)
        return formats.classified(body.model, *await service.classify(body.input, body.model))

    app.include_router(admin.routes(service))
    app.include_router(tokens.routes(service))
    app.include_router(score.routes(service))
    return app
