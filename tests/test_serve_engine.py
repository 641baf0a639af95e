"""The engine keeps one request's failure that request's, and stops work nobody waits for.

On a real server on loopback: a tiny temperature (9e-38, 1e-40) and an adapter whose
finite weights overflow to non-finite logits are mixed into a batch of greedy requests
for the base and other adapters; only the overflowing adapter's requests fail (422),
the tiny temperatures answer greedily, and every other answer equals its adapter run
alone. A client that gives up on a non-streaming request, or on one still waiting for
a row, frees it: the engine stops generating for it.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from lorakit.serve.toy import write_random_adapter
from serve_helpers import PROMPTS, Server, complete, error_of, make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    toy = make_toy(tmp_path_factory.mktemp("engine"), 3)
    model = AutoModelForCausalLM.from_pretrained(toy["model_dir"])
    # finite weights (1e20 < fp32's 3.4e38) whose products overflow: logits turn inf/NaN
    write_random_adapter(model, toy["root"] / "overflow", seed=7, scale=1e20)
    return toy


@pytest.fixture(scope="module")
def server(toy):
    adapters = [f"--adapter={name}={toy['root'] / name}" for name in toy["names"]]
    with Server(["--model", str(toy["model_dir"]), "--adapter-root", str(toy["root"]), "--max-batch", "32",
                 "--max-tokens", "480", *adapters], toy["tmp"] / "engine.log") as srv:
        yield srv


def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(url + "/v1/completions", json=b) for b in bodies))
    return asyncio.run(run())


def test_tiny_temperatures_and_an_overflowing_adapter_fail_no_other_request(server, toy):
    assert httpx.post(server.url + "/v1/adapters", json={"name": "overflow", "path": "overflow"}).status_code == 201
    greedy = [{"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "temperature": 0}
              for i, model in enumerate(["base", *toy["names"]] * 3)]
    tiny = [{"model": model, "prompt": PROMPTS[1], "max_tokens": 24, "temperature": t}
            for model, t in (("base", 9e-38), ("task0", 1e-40), ("task1", 5e-324), ("task2", 1e-6))]
    broken = [{"model": "overflow", "prompt": PROMPTS[2], "max_tokens": 24, "temperature": t} for t in (0, 0.7)]
    answers = _post_all(server.url, [*broken, *greedy, *tiny])
    refs, tokenizer, root = toy["refs"], toy["tokenizer"], toy["root"]

    for answer in answers[:len(broken)]:
        err = error_of(answer, 422)
        assert err["type"] == "adapter_error" and "NaN or infinite" in err["message"]
    for body, answer in zip(greedy + tiny, answers[len(broken):]):
        assert answer.status_code == 200, (body, answer.text)
        folder = None if body["model"] == "base" else root / body["model"]
        expected = refs.text(folder, tokenizer.encode(body["prompt"]), 24)
        assert answer.json()["choices"][0]["text"] == expected, body  # tiny temperatures are greedy
    # the server goes on serving, the overflowing adapter included (it fails again, alone)
    assert complete(server.url, "task1", PROMPTS[0], 4)["choices"][0]["text"] == refs.text(
        root / "task1", tokenizer.encode(PROMPTS[0]), 4)


def test_a_sampled_tiny_temperature_is_safe_and_seeded_sampling_repeats(server, toy):
    body = {"model": "task0", "prompt": PROMPTS[3], "max_tokens": 16, "seed": 5}
    hot = [complete(server.url, **body, temperature=1.0)["choices"][0]["text"] for _ in range(2)]
    cold = complete(server.url, **body, temperature=2e-5)["choices"][0]["text"]  # sampled: just above greedy
    assert hot[0] == hot[1]
    assert cold == toy["refs"].text(toy["root"] / "task0", toy["tokenizer"].encode(PROMPTS[3]), 16)


def _settle(url: str) -> dict:
    """/health once nothing runs or waits."""
    for _ in range(600):
        health = httpx.get(url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy: {health}")


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A bigger toy (a few ms per token) behind a server with a single row."""
    toy = make_toy(tmp_path_factory.mktemp("slow"), 0, layers=4, hidden=256)
    with Server(["--model", str(toy["model_dir"]), "--max-tokens", "480", "--max-batch", "1"],
                toy["tmp"] / "slow.log") as srv:
        yield srv


def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(slow):
    body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    full = complete(slow.url, "base", PROMPTS[0], 480, ignore_eos=True)
    print(f"480 tokens in {time.perf_counter() - start:.2f} s")
    assert full["usage"]["completion_tokens"] == 480  # what it costs when the client waits
    before = _settle(slow.url)["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    after = _settle(slow.url)["tokens_generated"]
    assert 0 < after - before < 480


def test_a_request_abandoned_while_waiting_leaves_the_queue(slow):
    """With one row busy, requests that wait and whose clients leave are dropped unstarted."""
    busy = {"model": "base", "prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    waiting = {"model": "base", "prompt": PROMPTS[2], "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    before = _settle(slow.url)["tokens_generated"]

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.create_task(client.post(slow.url + "/v1/completions", json=busy))
            await asyncio.sleep(0.1)
            gave_up = 0
            for _ in range(3):
                try:
                    await client.post(slow.url + "/v1/completions", json=waiting, timeout=httpx.Timeout(60, read=0.1))
                except httpx.ReadTimeout:
                    gave_up += 1
            return gave_up, await first

    gave_up, first = asyncio.run(run())
    assert first.status_code == 200 and gave_up == 3
    assert _settle(slow.url)["tokens_generated"] - before == 480  # none of the abandoned three ever ran
