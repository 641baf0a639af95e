"""Bounds at the server's door: the size of a request body.

:class:`BodyLimitMiddleware` answers 413 to a body over ``max_bytes`` before anything
parses it: at once when its ``Content-Length`` says so, and otherwise (a chunked body) as
soon as the bytes read pass the bound. The body is read here whole (it is at most
``max_bytes``) and handed on; what the client sends after it (a disconnect) still
reaches the route, which is how a route learns that its client went away.

The queue bound (``--max-queue``, 429) lives in :meth:`Service.check_room
<lorakit.serve.service.Service.check_room>`, the deadline (``--request-timeout``, 504)
in :mod:`lorakit.serve.generate`.
"""

from __future__ import annotations

from lorakit.serve import schemas


class BodyLimitMiddleware:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
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
        from fastapi.responses import JSONResponse

        size = f"{declared} bytes" if declared is not None else "more than that"
        message = (f"the request body is {size}; this server takes at most {self.max_bytes} bytes "
                   "(--max-body-bytes): send a shorter prompt")
        response = JSONResponse(schemas.error_body(message, "invalid_request_error", None, "request_too_large"),
                                status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)
