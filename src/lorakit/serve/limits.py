"""Bounds at the server's door: the size of a request body, and a full queue.

:class:`BodyLimitMiddleware` answers 413 to a body over ``max_bytes`` before anything
parses it: at once when its ``Content-Length`` says so, and otherwise (a chunked body) as
soon as the bytes read pass the bound. The body is read here whole (it is at most
``max_bytes``) and handed on; what the client sends after it (a disconnect) still
reaches the route, which is how a route learns that its client went away.

While the queue is full (``--max-queue``), a request to a route that would queue work is
answered 429 here, before its body is read or parsed: under a burst the refusals are the
cheapest answers the server gives. The exact bound (a request with ``n`` choices counts
``n``) is still checked by :meth:`Service.check_room
<lorakit.serve.service.Service.check_room>`; the deadline (``--request-timeout``, 504)
lives in :mod:`lorakit.serve.generate`.
"""

from __future__ import annotations

from collections.abc import Callable

from lorakit.serve import schemas

# the routes whose requests wait in the engine's queue
QUEUED_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/score", "/v1/rerank")


class BodyLimitMiddleware:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413, and requests to
    :data:`QUEUED_ROUTES` with 429 while ``queue_full()`` returns a message."""

    def __init__(self, app, max_bytes: int, queue_full: Callable[[], str | None] = lambda: None):
        self.app, self.max_bytes, self.queue_full = app, max_bytes, queue_full

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        if scope.get("path") in QUEUED_ROUTES and (full := self.queue_full()):
            return await self._answer(scope, receive, send, full, 429, "rate_limit_error", "rate_limit_exceeded",
                                      {"Retry-After": "1", "Connection": "close"})
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False  # the server itself refuses a malformed length
            if too_big:
                return await self._refuse(scope, receive, send, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body ended
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, None)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, declared: int | None):
        size = f"{declared} bytes" if declared is not None else "more than that"
        message = (f"the request body is {size}; this server takes at most {self.max_bytes} bytes "
                   "(--max-body-bytes): send a shorter prompt")
        await self._answer(scope, receive, send, message, 413, "invalid_request_error", "request_too_large",
                           {"Connection": "close"})

    @staticmethod
    async def _answer(scope, receive, send, message: str, status: int, kind: str, code: str, headers: dict):
        """An error in OpenAI's shape; the body, unread, is dropped with the connection."""
        from fastapi.responses import JSONResponse

        response = JSONResponse(schemas.error_body(message, kind, None, code), status_code=status, headers=headers)
        await response(scope, receive, send)
