"""Who may talk to the server: API keys and the ``Host`` header.

- ``api_key`` (``--api-key`` or ``LORAKIT_API_KEY``): every ``/v1/*`` route, ``/tokenize`` and
  ``/detokenize`` need ``Authorization: Bearer <key>`` (401 otherwise). ``/health`` and
  ``/metrics`` stay open.
- ``admin_key`` (``--admin-key``): the routes that load and unload adapters need it
  (403 for the ordinary key); it is accepted on every other route too. Without it those
  routes need the ordinary key. Loading on demand is not an admin act: it reads only
  folders under the adapter root, which the operator filled.
- Keys are compared in constant time (``hmac.compare_digest``), so the time an answer
  takes says nothing about how much of a guess was right.
- ``hosts``: the ``Host`` header must name one of them (port ignored), so a web page
  that rebinds its own domain name to this machine's address cannot reach the server
  from a browser (DNS rebinding). :func:`allowed_hosts` makes the set: the bound
  address, ``localhost``, ``127.0.0.1`` and ``::1``, plus ``--allowed-hosts``
  (``*`` turns the check off).

Written here rather than with Starlette's ``TrustedHostMiddleware`` so that a refusal
comes in OpenAI's error shape like every other answer.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from lorakit.errors import LorakitError
from lorakit.serve import schemas

KEYED_PATHS = ("/tokenize", "/detokenize")  # vLLM's token routes (lorakit.serve.tokens), keyed as /v1/ is
ADMIN_ROUTES = (("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/"), ("POST", "/v1/load_lora_adapter"),
                ("POST", "/v1/unload_lora_adapter"))
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Access:
    """The keys and host names a server accepts.

    Attributes:
        api_key: the key of every ``/v1/*`` route; None leaves them open.
        admin_key: the key of the adapter load/unload routes; None: ``api_key`` guards them.
        hosts: ``Host`` names accepted (lower case, no port); None accepts any.
    """

    api_key: str | None = None
    admin_key: str | None = None
    hosts: frozenset[str] | None = field(default=None)

    def __post_init__(self) -> None:
        for flag, key in (("--api-key", self.api_key), ("--admin-key", self.admin_key)):
            if key is not None and (not key or not key.isprintable() or not key.isascii()):
                raise LorakitError(f"{flag} must be a non-empty string of printable ASCII characters")


def allowed_hosts(bound: str, extra: list[str] | None = None) -> frozenset[str] | None:
    """The ``Host`` names a server bound to ``bound`` accepts; None (no check) when
    ``extra`` holds ``*``."""
    extra = [h.strip().lower() for h in (extra or []) if h.strip()]
    if "*" in extra:
        return None
    return frozenset({bound.lower().strip("[]"), *LOCAL_NAMES, *extra})


def host_name(header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _same(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode())


def _is_admin(method: str, path: str) -> bool:
    return any(method == m and (path == p or (p.endswith("/") and path.startswith(p))) for m, p in ADMIN_ROUTES)


class AccessMiddleware:
    """ASGI middleware: refuses a bad ``Host`` (400) and a missing or wrong key (401/403)."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.check(scope)
        if refusal is None:
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        status, kind, code, message = refusal
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        response = JSONResponse(schemas.error_body(message, kind, None, code), status_code=status, headers=headers)
        await response(scope, receive, send)

    def check(self, scope) -> tuple[int, str, str, str] | None:
        """None to let the request through, else ``(status, type, code, message)``."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        access = self.access
        if access.hosts is not None and host_name(headers.get("host", "")) not in access.hosts:
            return (400, "invalid_request_error", "invalid_host",
                    "the Host header names a host this server does not answer for; "
                    "start it with --allowed-hosts NAME to accept that name")
        path = scope.get("path", "")
        if not (path.startswith("/v1/") or path in KEYED_PATHS):
            return None
        admin = _is_admin(scope.get("method", "GET"), path)
        needed = access.admin_key if admin and access.admin_key else access.api_key
        if needed is None:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return (401, "invalid_request_error", "missing_api_key",
                    "this server needs an API key: send the header 'Authorization: Bearer <key>'")
        if _same(given, needed) or (access.admin_key is not None and _same(given, access.admin_key)):
            return None
        if admin and access.admin_key and access.api_key is not None and _same(given, access.api_key):
            return (403, "permission_error", "admin_key_required",
                    "loading and unloading adapters needs the admin key (--admin-key), not the API key")
        return (401, "invalid_request_error", "invalid_api_key", "the API key given is not valid for this server")
