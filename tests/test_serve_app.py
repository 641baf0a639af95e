"""`lorakit serve` end to end: a real server in a subprocess on a free loopback port,
talked to with httpx and the official `openai` client (see ``serve_helpers``: a toy
model, random adapters, and each adapter's answer computed without lorakit)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from serve_helpers import PROMPTS, Server, make_toy
from serve_helpers import complete as _complete
from serve_helpers import error_of as _error

from lorakit.serve.app import create_app
from lorakit.serve.service import build_service
from lorakit.serve.toy import write_random_adapter

N_ADAPTERS = 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy model folder, an adapter root with 8 adapters, and their "alone" references."""
    return make_toy(tmp_path_factory.mktemp("serve"), N_ADAPTERS)


@pytest.fixture(scope="module")
def server(toy):
    adapters = [f"--adapter={name}={toy['root'] / name}" for name in toy["names"][:2]]
    srv = Server(["--model", str(toy["model_dir"]), "--adapter-root", str(toy["root"]), "--max-loaded", "6",
                  "--max-batch", "32", "--max-tokens", "64", "--max-prompt-tokens", "100", *adapters],
                 toy["tmp"] / "server.log")
    # the other six are loaded over HTTP, by a path relative to the root
    for name in toy["names"][2:]:
        answer = httpx.post(srv.url + "/v1/adapters", json={"name": name, "path": name}, timeout=30)
        assert answer.status_code == 201, answer.text
    yield srv
    assert srv.stop() == 0, toy["tmp"].joinpath("server.log").read_text()


def test_health_and_models_list_the_base_and_each_adapter_with_its_parent(server, toy):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["task"] == "generate"
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[0]["id"] == "base" and models[0]["parent"] is None
    assert {m["id"]: m["parent"] for m in models[1:]} == {name: "base" for name in toy["names"]}


def test_64_concurrent_greedy_requests_over_8_adapters_match_each_adapter_alone(server, toy):
    jobs = [(toy["names"][i % N_ADAPTERS], PROMPTS[(i // N_ADAPTERS) % len(PROMPTS)], 8 + (i * 7) % 17)
            for i in range(64)]

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            async def one(adapter, prompt, max_tokens):
                r = await client.post(server.url + "/v1/completions", json={
                    "model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(*job) for job in jobs))

    answers = asyncio.run(run_all())
    tokenizer, refs = toy["tokenizer"], toy["refs"]
    for (adapter, prompt, max_tokens), answer in zip(jobs, answers):
        expected = refs.text(toy["root"] / adapter, tokenizer.encode(prompt), max_tokens)
        assert answer["choices"][0]["text"] == expected, (adapter, prompt, max_tokens)
        assert answer["model"] == adapter
    # the adapters really differ, so a mixed-up row would be caught
    first_prompt = [refs.text(toy["root"] / name, tokenizer.encode(PROMPTS[0]), 8) for name in toy["names"]]
    assert len(set(first_prompt)) == N_ADAPTERS
    assert refs.text(None, tokenizer.encode(PROMPTS[0]), 8) not in first_prompt
    # 8 adapters, at most 6 resident: some were evicted and loaded again from disk
    assert httpx.get(server.url + "/health").json()["adapters_resident"] <= 6
    loads = {m["id"]: m["loads"] for m in httpx.get(server.url + "/v1/models").json()["data"][1:]}
    assert max(loads.values()) >= 2, loads


def test_base_model_answers_as_the_plain_model(server, toy):
    ids = toy["tokenizer"].encode(PROMPTS[1])
    answer = _complete(server.url, "base", PROMPTS[1], 12)
    assert answer["choices"][0]["text"] == toy["refs"].text(None, ids, 12)
    assert answer["usage"]["prompt_tokens"] == len(ids)


def _sse_events(url: str, path: str, body: dict) -> list:
    events = []
    with httpx.stream("POST", url + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events


def test_streaming_yields_the_same_text_as_the_whole_answer(server, toy):
    body = {"model": "task3", "prompt": PROMPTS[3], "max_tokens": 30, "temperature": 0}
    whole = _complete(server.url, "task3", PROMPTS[3], 30)["choices"][0]
    events = _sse_events(server.url, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert len(chunks) > 2


def test_openai_client_chat_and_completions_streamed_and_not(server, toy):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"base", *toy["names"]}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you?"}]
    whole = client.chat.completions.create(model="task5", messages=messages, max_tokens=20, temperature=0)
    text = whole.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="task5", messages=messages, max_tokens=20, temperature=0, stream=True))
    assert streamed == text
    tokenizer = toy["tokenizer"]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                  add_special_tokens=False)
    assert text == toy["refs"].text(toy["root"] / "task5", prompt_ids, 20)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    completion = client.completions.create(model="task6", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert completion.choices[0].text == toy["refs"].text(toy["root"] / "task6", tokenizer.encode(PROMPTS[0]), 10)
    with pytest.raises(openai.NotFoundError, match="task0, task1"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)


def test_a_list_of_prompts_or_of_token_ids_answers_each_in_order(server, toy):
    import openai

    tokenizer = toy["tokenizer"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1]]
    batch = client.completions.create(model="task2", prompt=prompts, max_tokens=8, temperature=0, n=2)
    expected = [toy["refs"].text(toy["root"] / "task2", tokenizer.encode(p), 8) for p in prompts]
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in batch.choices] == [text for text in expected for _ in range(2)]  # prompt i: 2i, 2i+1
    assert batch.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    ids = [tokenizer.encode(p) for p in prompts[:2]]
    by_ids = client.completions.create(model="task2", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in by_ids.choices] == expected[:2]
    one = client.completions.create(model="task2", prompt=ids[1], max_tokens=8, temperature=0)
    assert one.choices[0].text == expected[1]
    streamed = _sse_events(server.url, "/v1/completions", {"model": "task2", "prompt": prompts, "max_tokens": 8,
                                                           "temperature": 0, "stream": True})
    texts = {}
    for event in streamed[:-1]:
        choice = json.loads(event)["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in range(3)] == expected
    err = _error(httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": [[1, 10**6]]}), 400)
    assert err["param"] == "prompt" and "token id 1000000" in err["message"]
    err = _error(httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": []}), 422)
    assert err["param"] == "prompt"


def test_sampling_with_a_seed_repeats_and_stop_strings_cut_the_answer(server, toy):
    sampled = [_complete(server.url, "task1", PROMPTS[4], 20, temperature=1.0, top_p=0.9, seed=42)["choices"][0]["text"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    greedy = _complete(server.url, "task1", PROMPTS[4], 20)["choices"][0]["text"]
    stop = greedy[5:8]
    cut = _complete(server.url, "task1", PROMPTS[4], 20, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy[: greedy.index(stop)]
    streamed = _sse_events(server.url, "/v1/completions", {"model": "task1", "prompt": PROMPTS[4], "max_tokens": 20,
                                                           "temperature": 0, "stop": stop, "stream": True})
    assert "".join(json.loads(e)["choices"][0]["text"] for e in streamed[:-1]) == cut["text"]


def test_bad_input_answers_400_or_422_naming_the_field(server, toy):
    url = server.url
    err = _error(httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    err = _error(httpx.post(url + "/v1/completions", json={"model": "base"}), 422)
    assert err["param"] == "prompt"
    err = _error(httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": "many"}), 422)
    assert "max_tokens" in err["message"]
    err = _error(httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x", "temperature": -1}), 422)
    assert err["param"] == "temperature"
    err = _error(httpx.post(url + "/v1/chat/completions", json={"model": "base", "messages": [{"role": "cat", "content": "x"}]}), 422)
    assert "messages.0.role" in err["message"]
    err = _error(httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 65}), 400)
    assert err["param"] == "max_tokens" and "64" in err["message"]
    err = _error(httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "fox " * 200}), 400)
    assert err["param"] == "prompt" and "100" in err["message"]
    err = _error(httpx.post(url + "/v1/completions", json={"model": "sql", "prompt": "x"}), 404)
    assert "'sql' not found" in err["message"] and "base, task0, task1" in err["message"]
    err = _error(httpx.post(url + "/v1/classify", json={"model": "base", "input": "x"}), 400)
    assert "generate model" in err["message"]


def test_adapter_loading_is_confined_to_the_root_and_bad_files_do_not_stop_the_server(server, toy):
    url = server.url
    err = _error(httpx.post(url + "/v1/adapters", json={"name": "bad name!", "path": "task0"}), 422)
    assert err["param"] == "name"
    err = _error(httpx.post(url + "/v1/adapters", json={"name": "escape", "path": "../model"}), 403)
    assert "outside the adapter root" in err["message"]
    os.symlink(toy["tmp"], toy["root"] / "link")
    err = _error(httpx.post(url + "/v1/adapters", json={"name": "escape", "path": "link"}), 403)
    assert "outside the adapter root" in err["message"]
    err = _error(httpx.post(url + "/v1/adapters", json={"name": "task0", "path": "task1"}), 409)
    assert "already loaded" in err["message"]
    err = _error(httpx.post(url + "/v1/adapters", json={"name": "broken", "path": "broken"}), 400)
    assert "'broken'" in err["message"]
    _error(httpx.delete(url + "/v1/adapters/nope"), 404)
    # still serving, and the broken one is not listed
    assert _complete(url, "task2", PROMPTS[0], 4)["choices"][0]["text"] == toy["refs"].text(
        toy["root"] / "task2", toy["tokenizer"].encode(PROMPTS[0]), 4)
    assert "broken" not in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}


def test_loading_and_unloading_while_requests_are_in_flight_loses_none(server, toy):
    url, root, refs, tokenizer = server.url, toy["root"], toy["refs"], toy["tokenizer"]
    shutil.copytree(root / "task7", root / "task7-copy")
    jobs = [(toy["names"][i % 4 + 4], PROMPTS[i % len(PROMPTS)], 40) for i in range(24)]

    async def run_all():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(adapter, prompt, max_tokens):
                r = await client.post(url + "/v1/completions", json={
                    "model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                return r.status_code, r.json()

            async def churn():
                await asyncio.sleep(0.05)
                added = await client.post(url + "/v1/adapters", json={"name": "extra", "path": "task7-copy"})
                removed = await client.delete(url + "/v1/adapters/task4")  # requests for it are running
                extra = await one("extra", PROMPTS[2], 6)
                gone = await one("task4", PROMPTS[2], 6)
                return added.status_code, removed.status_code, extra, gone

            return await asyncio.gather(churn(), *(one(*job) for job in jobs))

    (added, removed, extra, gone), *answers = asyncio.run(run_all())
    assert (added, removed) == (201, 200)
    for (adapter, prompt, max_tokens), (status, body) in zip(jobs, answers):
        assert status == 200, body
        assert body["choices"][0]["text"] == refs.text(root / adapter, tokenizer.encode(prompt), max_tokens)
    assert extra[0] == 200 and extra[1]["choices"][0]["text"] == refs.text(root / "task7", tokenizer.encode(PROMPTS[2]), 6)
    assert gone[0] == 404
    # task4 can come back under the same name
    assert httpx.post(url + "/v1/adapters", json={"name": "task4", "path": "task4"}).status_code == 201


def test_shutdown_finishes_the_requests_in_flight(toy):
    srv = Server(["--model", str(toy["model_dir"]), "--adapter", f"task0={toy['root'] / 'task0'}"],
                 toy["tmp"] / "shutdown.log")
    try:
        body = {"model": "task0", "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0, "stream": True}
        pieces = []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0])
                    break
            srv.proc.send_signal(signal.SIGTERM)
            for line in lines:
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0])
                elif line == "data: [DONE]":
                    pieces.append("[DONE]")
        assert pieces[-1] == "[DONE]"
        text = "".join(p["text"] for p in pieces[:-1])
        assert pieces[-2]["finish_reason"] in ("length", "stop")
        ids = toy["tokenizer"].encode(PROMPTS[0])
        assert text == toy["refs"].text(toy["root"] / "task0", ids, 300)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


# The server on the real embedded chat model (SmolLM2-135M-Instruct): its chat template, its
# byte-level tokenizer, a rank-8 adapter on every linear layer of its blocks, in-process
# (TestClient) to keep it quick; greedy answers equal lorakit's own forward with that adapter.
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def one_thread():
    """Batch-1 decoding of a 135M model on a shared 2-core machine: one thread is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_smollm2_chat_with_two_adapters_matches_each_alone(tmp_path, one_thread):
    from lorakit.io import load_adapter
    from lorakit.model import set_active
    from lorakit.models import load_causal_lm

    reference, tokenizer = load_causal_lm("default-chat")
    for name, seed in (("formal", 1), ("terse", 2)):
        write_random_adapter(reference, tmp_path / name, seed=seed, r=8, scale=2.0)
    service = build_service("default-chat", adapter_root=str(tmp_path), max_loaded=2, max_batch=4)
    answers, streamed = {}, {}
    with TestClient(create_app(service)) as client:
        for name in ("formal", "terse"):
            assert client.post("/v1/adapters", json={"name": name, "path": name}).status_code == 201
        for model in ("base", "formal", "terse"):
            body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
            answers[model] = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                chunks = [json.loads(line[6:]) for line in response.iter_lines()
                          if line.startswith("data: {")]
            streamed[model] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)

    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(ids, add_special_tokens=False)])
    expected = {}
    for model in ("base", "formal", "terse"):
        if model == "base":
            set_active(reference)
        else:
            load_adapter(reference, tmp_path / model, model)
            set_active(reference, model)
        out = reference.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected[model] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answers == expected
    assert streamed == answers
    assert len(set(answers.values())) == 3  # the adapters change the answer
