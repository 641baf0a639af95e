"""The server bounds what it takes in: bodies (413 before parsing, tokenizing off the event
loop), waiting requests (429 with Retry-After, none lost, no 5xx), time (504), and a
client that leaves mid-stream frees its row at the next step. Real servers on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from serve_helpers import PROMPTS, Server, error_of, make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("limits"), 0, layers=4, hidden=256)


@pytest.fixture(scope="module")
def server(toy):
    with Server(["--model", str(toy["model_dir"]), "--max-queue", "4", "--max-batch", "2", "--max-tokens", "480",
                 "--max-body-bytes", "4000000"], toy["tmp"] / "limits.log") as srv:
        yield srv


def _settle(url: str) -> dict:
    for _ in range(600):
        health = httpx.get(url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy: {health}")


def test_bodies_over_the_bound_get_413_before_they_are_read(server):
    big = json.dumps({"model": "base", "prompt": "fox " * 1_100_000}).encode()  # 4.4 MB
    err = error_of(httpx.post(server.url + "/v1/completions", content=big,
                              headers={"content-type": "application/json"}), 413)
    assert "4000000" in err["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    error_of(httpx.post(server.url + "/v1/completions", content=chunked(),
                        headers={"content-type": "application/json"}), 413)


def test_a_long_prompt_is_tokenized_off_the_event_loop(server):
    """While a 3.6 MB prompt is tokenized, /health keeps answering."""
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            big = asyncio.create_task(client.post(server.url + "/v1/completions",
                                                  json={"model": "base", "prompt": "fox jumps " * 360_000}))
            await asyncio.sleep(0.05)
            answered = 0
            while not big.done():
                if (await client.get(server.url + "/health")).status_code == 200 and not big.done():
                    answered += 1
            return answered, await big

    answered, big = asyncio.run(run())
    err = error_of(big, 400)
    assert err["param"] == "prompt" and "tokens" in err["message"]
    assert answered >= 3, answered


def test_a_burst_of_four_times_the_queue_gets_429s_and_no_request_is_lost(server):
    body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(server.url + "/v1/completions", json=body) for _ in range(24)))

    answers = asyncio.run(run())
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 4  # at least --max-queue accepted
    for answer in answers:
        if answer.status_code == 429:
            assert answer.headers["retry-after"] == "1"
            assert error_of(answer, 429)["code"] == "rate_limit_exceeded"
        else:
            assert answer.json()["usage"]["completion_tokens"] == 60  # every accepted one completed
    assert _settle(server.url)["waiting"] == 0


def test_a_stream_dropped_mid_way_frees_its_row(server):
    body = {"model": "base", "prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True}
    before = _settle(server.url)["tokens_generated"]
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 3:
                break
    assert 3 <= _settle(server.url)["tokens_generated"] - before < 480


@pytest.fixture(scope="module")
def hurried(toy):
    with Server(["--model", str(toy["model_dir"]), "--max-tokens", "480", "--request-timeout", "0.4"],
                toy["tmp"] / "hurried.log") as srv:
        yield srv


def test_past_the_request_timeout_the_answer_is_504_and_the_row_is_freed(hurried):
    body = {"model": "base", "prompt": PROMPTS[2], "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    before = _settle(hurried.url)["tokens_generated"]
    err = error_of(httpx.post(hurried.url + "/v1/completions", json=body, timeout=60), 504)
    assert err["type"] == "timeout_error" and "0.4 s" in err["message"]
    assert _settle(hurried.url)["tokens_generated"] - before < 480
    events = []
    with httpx.stream("POST", hurried.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "timeout_error"
    quick = httpx.post(hurried.url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert quick.status_code == 200



def _through_door(full: str | None, receive) -> tuple[list[dict], list[str]]:
    """What :class:`BodyLimitMiddleware` sends for a POST to /v1/completions, and the routes reached."""
    from lorakit.serve.limits import BodyLimitMiddleware

    sent, reached = [], []

    async def route(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        sent.append(message)

    door = BodyLimitMiddleware(route, max_bytes=100, queue_full=lambda: full)
    asyncio.run(door({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send))
    return sent, reached


def test_a_full_queue_is_answered_429_at_the_door_before_the_body_is_read():
    async def never():
        raise AssertionError("the body was read")

    sent, reached = _through_door("the server has 4 requests waiting (--max-queue 4); retry in a second", never)
    assert sent[0]["status"] == 429 and (b"retry-after", b"1") in sent[0]["headers"] and not reached
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "rate_limit_exceeded" and "--max-queue 4" in error["message"]

    async def body():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    sent, reached = _through_door(None, body)  # room in the queue: on to the route
    assert sent[0]["status"] == 200 and reached == ["/v1/completions"]
