"""``lorakit serve``: one base model, many LoRA adapters, an OpenAI-compatible HTTP API.

- :mod:`~lorakit.serve.registry`: adapter names and folders, LRU of resident adapters.
- :mod:`~lorakit.serve.engine`: the thread that owns the model; continuous batching of
  decode steps across adapters (:mod:`~lorakit.serve.kv` keeps the per-row KV cache,
  :mod:`~lorakit.serve.sampling` picks tokens, :mod:`~lorakit.serve.detokenize` streams text).
- :mod:`~lorakit.serve.service`: model + registry + engine + limits, no HTTP.
- :mod:`~lorakit.serve.app`: the FastAPI application; :mod:`~lorakit.serve.generate`,
  :mod:`~lorakit.serve.admin`, :mod:`~lorakit.serve.tokens` and :mod:`~lorakit.serve.score` its routes,
  :mod:`~lorakit.serve.schemas` their bodies (the score routes' own in their module),
  :mod:`~lorakit.serve.formats` OpenAI's answers, :mod:`~lorakit.serve.responses` its errors;
  :mod:`~lorakit.serve.auth` (keys, ``Host``), :mod:`~lorakit.serve.limits` (body size) and
  :mod:`~lorakit.serve.metrics` (Prometheus) around them.
- :mod:`~lorakit.serve.confine`: reading adapter files only from under the adapter root.

From Python::

    from lorakit.serve import build_service, run
    run(build_service("default-chat", adapters={"sql": "adapters/sql"}), port=8000)
"""

from __future__ import annotations

import signal
import threading

from lorakit.serve.auth import Access, allowed_hosts
from lorakit.serve.service import Service, build_service


def run(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        access: Access | None = None) -> None:
    """Serve ``service`` with uvicorn until SIGINT or SIGTERM; requests in flight finish first.

    ``access``: API keys and accepted ``Host`` names (default: no keys; ``host``,
    ``localhost``, ``127.0.0.1`` and ``::1`` as Host).
    """
    import uvicorn

    from lorakit.serve.app import create_app

    access = access or Access(hosts=allowed_hosts(host))

    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM after its graceful shutdown; exit 0 then, not "killed".
        def on_sigterm(signum, frame):
            raise SystemExit(0 if service.stopped else 128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)
    uvicorn.run(create_app(service, access), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)


__all__ = ["Access", "Service", "allowed_hosts", "build_service", "run"]
