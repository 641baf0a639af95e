"""``GET /metrics``: what the server is doing, in Prometheus' text format (``prometheus_client``).

=========================================== ======================================================
``lorakit_requests_total``                  ``/v1/*`` requests answered, by ``endpoint``,
                                            ``adapter`` and HTTP ``status``
``lorakit_generated_tokens_total``          tokens generated, by ``adapter``
``lorakit_queue_depth``                     requests waiting for a row
``lorakit_running_requests``                requests decoding (the batch of the next step)
``lorakit_adapters_resident``               adapters attached to the model now
``lorakit_time_to_first_token_seconds``     from a request's arrival at the engine to its
                                            first token's text
``lorakit_time_per_output_token_seconds``   per request: (last token - first token) / (tokens - 1)
``lorakit_adapter_load_seconds``            reading an adapter and attaching it to the model
=========================================== ======================================================

Label values are bounded: ``adapter`` is ``base``, the name of an adapter resident when
the request ends, or ``other`` (unknown names, adapters not resident, bodies that did not
parse); ``endpoint`` is one of the API's routes or ``other``. So a client sending random
model names cannot grow the number of series; only adapters the operator put under the
root can. Each server has its own registry (several may run in one process).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lorakit.serve.registry import BASE

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/score", "/v1/rerank", "/v1/models",
             "/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
OTHER = "other"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's Prometheus metrics; gauges read ``service`` when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, service):
        self.service = service
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "HTTP requests answered under /v1/",
                                ["endpoint", "adapter", "status"], registry=r)
        self.tokens = Counter("lorakit_generated_tokens", "tokens generated", ["adapter"], registry=r)
        Gauge("lorakit_queue_depth", "requests waiting for a row", registry=r).set_function(service.queued)
        Gauge("lorakit_running_requests", "requests decoding now", registry=r).set_function(service.engine.running)
        Gauge("lorakit_adapters_resident", "adapters attached to the model",
              registry=r).set_function(service.registry.resident_count)
        self.first_token = Histogram("lorakit_time_to_first_token_seconds", "seconds to a request's first token",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("lorakit_time_per_output_token_seconds", "seconds per generated token after the first",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("lorakit_adapter_load_seconds", "seconds to load an adapter",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        service.registry.on_load = lambda entry: self.adapter_load.observe(entry.last_load_s or 0.0)

    def adapter_label(self, name: object) -> str:
        """``name`` if it is the base or a resident adapter, else ``other`` (bounded cardinality)."""
        if name == BASE:
            return BASE
        if isinstance(name, str) and self.service.registry.is_resident(name):
            return name
        return OTHER

    def record_request(self, path: str, adapter: object, status: int) -> None:
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), OTHER)
        self.requests.labels(endpoint, self.adapter_label(adapter), str(status)).inc()

    def record_generation(self, adapter: str, tokens: int, first_token_s: float | None, last_token_s: float | None):
        """One finished choice: ``tokens`` generated, seconds from arrival to the first and last token."""
        self.tokens.labels(self.adapter_label(adapter)).inc(tokens)
        if first_token_s is not None:
            self.first_token.observe(first_token_s)
            if tokens > 1 and last_token_s is not None:
                self.per_token.observe((last_token_s - first_token_s) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting every ``/v1/*`` answer by endpoint, adapter and status.

    The adapter is what the route stored in ``request.state.adapter`` (absent when the
    request was refused before a route read its body)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.record_request(scope["path"], state.get("adapter"), status)
