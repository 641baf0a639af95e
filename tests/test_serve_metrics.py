"""``GET /metrics`` on a real server on loopback parses with prometheus_client's own
parser, and its counters equal the requests sent: by endpoint, adapter and status, the
tokens generated, one first-token latency per answer; random model names all count as
``other`` (bounded label cardinality)."""

from __future__ import annotations

import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_helpers import PROMPTS, Server, make_toy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("metrics"), 1)
    with Server(["--model", str(toy["model_dir"]), "--adapter", f"task0={toy['root'] / 'task0'}"],
                toy["tmp"] / "metrics.log") as srv:
        yield srv


def _scrape(url: str) -> dict:
    """``{(sample name, frozenset(labels.items())): value}`` of every sample."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_match_the_requests_sent(server):
    url = server.url
    before = _scrape(url)
    tokens = {"base": 0, "task0": 0}
    with_text = 0
    for model, count in (("base", 3), ("task0", 2)):
        for i in range(count):
            answer = httpx.post(url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": PROMPTS[i], "max_tokens": 5 + i, "temperature": 0, "ignore_eos": True})
            tokens[model] += answer.json()["usage"]["completion_tokens"]
            with_text += bool(answer.json()["choices"][0]["text"])
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "model": "task0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True,
            "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200 and list(response.iter_lines())
    tokens["task0"] += 4
    with_text += 1
    names = [f"random-{uuid.uuid4().hex}" for _ in range(20)]
    for name in names:
        assert httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x"}).status_code == 404
    assert httpx.post(url + "/v1/completions", json={"model": "base"}).status_code == 422

    after = _scrape(url)

    def grew(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    c = "lorakit_requests_total"
    assert grew(c, endpoint="/v1/completions", adapter="base", status="200") == 3
    assert grew(c, endpoint="/v1/completions", adapter="task0", status="200") == 2
    assert grew(c, endpoint="/v1/chat/completions", adapter="task0", status="200") == 1
    assert grew(c, endpoint="/v1/completions", adapter="other", status="404") == 20
    assert grew(c, endpoint="/v1/completions", adapter="other", status="422") == 1
    assert grew("lorakit_generated_tokens_total", adapter="base") == tokens["base"]
    assert grew("lorakit_generated_tokens_total", adapter="task0") == tokens["task0"]
    assert grew("lorakit_time_to_first_token_seconds_count") == with_text
    assert grew("lorakit_time_per_output_token_seconds_count") == with_text
    assert _value(after, "lorakit_queue_depth") == 0 and _value(after, "lorakit_running_requests") == 0
    assert _value(after, "lorakit_adapters_resident") == 1
    adapters = {dict(labels).get("adapter") for name, labels in after if name == c}
    assert adapters <= {"base", "task0", "other"}  # 20 random names made no series of their own
    assert not any(n in str(after) for n in names)
