"""Loading adapters on their first request (``--load-on-demand``), on a real server on
loopback: 16 concurrent first requests for one adapter load it once and all get its
answer; names that are not folders under the root stay 404; a folder that links outside
the root is refused; the LRU keeps at most ``--max-loaded`` resident."""

from __future__ import annotations

import asyncio
import os
import shutil

import httpx
import pytest

from serve_helpers import PROMPTS, Server, error_of, make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("service"), 4)
    shutil.copytree(toy["root"] / "task0", toy["tmp"] / "outside")
    os.symlink(toy["tmp"] / "outside", toy["root"] / "sneaky")
    return toy


@pytest.fixture(scope="module")
def server(toy):
    with Server(["--model", str(toy["model_dir"]), "--adapter-root", str(toy["root"]), "--load-on-demand",
                 "--max-loaded", "2"], toy["tmp"] / "service.log") as srv:
        yield srv


def _loads(url: str) -> dict:
    return {m["id"]: m.get("loads") for m in httpx.get(url + "/v1/models").json()["data"]}


def test_sixteen_concurrent_first_requests_load_the_adapter_once(server, toy):
    assert "task3" not in _loads(server.url)
    body = {"model": "task3", "prompt": PROMPTS[5], "max_tokens": 10, "temperature": 0}

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(client.post(server.url + "/v1/completions", json=body) for _ in range(16)))

    answers = asyncio.run(run())
    expected = toy["refs"].text(toy["root"] / "task3", toy["tokenizer"].encode(PROMPTS[5]), 10)
    assert all(a.status_code == 200 and a.json()["choices"][0]["text"] == expected for a in answers), \
        [a.text for a in answers if a.status_code != 200]
    assert _loads(server.url)["task3"] == 1
    metrics = httpx.get(server.url + "/metrics").text
    assert "lorakit_adapter_load_seconds_count 1.0" in metrics


def test_names_not_under_the_root_stay_404_and_escapes_are_refused(server, toy):
    for name in ("nothere", "../model", "task3/..", ".", "model"):
        error_of(httpx.post(server.url + "/v1/completions", json={"model": name, "prompt": "x"}), 404)
    err = error_of(httpx.post(server.url + "/v1/completions", json={"model": "sneaky", "prompt": "x"}), 403)
    assert str(toy["tmp"]) not in err["message"]
    err = error_of(httpx.post(server.url + "/v1/completions", json={"model": "broken", "prompt": "x"}), 400)
    assert err["type"] == "adapter_load_error" and str(toy["root"]) not in err["message"]
    assert not {"nothere", "sneaky", "broken"} & set(_loads(server.url))


def test_on_demand_adapters_go_through_the_lru(server, toy):
    refs, tokenizer, root = toy["refs"], toy["tokenizer"], toy["root"]
    for name in ("task0", "task1", "task2", "task0"):
        answer = httpx.post(server.url + "/v1/completions", timeout=60,
                            json={"model": name, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
        assert answer.json()["choices"][0]["text"] == refs.text(root / name, tokenizer.encode(PROMPTS[0]), 5)
    assert httpx.get(server.url + "/health").json()["adapters_resident"] <= 2
    assert _loads(server.url)["task0"] == 2  # evicted by task2, loaded again
