"""Request bodies a careless or hostile client sends get a 4xx in OpenAI's error shape,
never a 500 or a plain-text body: a seed past 64 bits, lone UTF-16 surrogates, integers
sent as strings or booleans, a 100,000-character model name (echoed cut short)."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import PROMPTS, Server, complete, error_of, make_toy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("schemas"), 1)
    with Server(["--model", str(toy["model_dir"]), "--adapter", f"task0={toy['root'] / 'task0'}"],
                toy["tmp"] / "schemas.log") as srv:
        yield srv


def _post(url: str, path: str, raw: str) -> httpx.Response:
    """POST a JSON text as written (so escapes such as \\ud800 reach the server as sent)."""
    return httpx.post(url + path, content=raw.encode(), headers={"content-type": "application/json"}, timeout=30)


def test_seeds_must_fit_in_64_bits(server):
    for seed in (2**63 - 1, -(2**63), 0, 12345):
        complete(server.url, "task0", PROMPTS[0], 4, temperature=1.0, seed=seed)
    for seed in (2**63, 2**64, -(2**63) - 1, 10**30):
        err = error_of(httpx.post(server.url + "/v1/completions", json={
            "model": "task0", "prompt": "x", "max_tokens": 2, "temperature": 1.0, "seed": seed}), 422)
        assert err["param"] == "seed"


def test_lone_surrogates_are_refused_with_422(server):
    bodies = {
        "/v1/chat/completions": '{"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        "/v1/completions": '{"model": "base", "max_tokens": 2, "prompt": "\\udfff x"}',
    }
    for path, raw in bodies.items():
        err = error_of(_post(server.url, path, raw), 422)
        assert "surrogate" in err["message"], err
    err = error_of(_post(server.url, "/v1/completions", '{"model": "\\ud800", "prompt": "x"}'), 422)
    assert err["param"] == "model"


def test_numbers_must_be_json_numbers(server):
    for bad in ("2", True, 2.5):
        err = error_of(httpx.post(server.url + "/v1/completions",
                                  json={"model": "base", "prompt": "x", "max_tokens": bad}), 422)
        assert err["param"] == "max_tokens"
    err = error_of(httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "x", "n": "2"}), 422)
    assert err["param"] == "n"
    for field, bad in (("temperature", True), ("temperature", "0.5"), ("top_p", False), ("stream", "yes")):
        err = error_of(httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "x", field: bad}), 422)
        assert err["param"] == field
    complete(server.url, "base", "x", 2, temperature=1, top_p=1)  # JSON integers are numbers too


def test_a_huge_model_name_is_not_echoed_whole(server):
    err = error_of(httpx.post(server.url + "/v1/completions", json={"model": "m" * 100_000, "prompt": "x"}), 404)
    assert len(err["message"]) < 400 and "100000 characters" in err["message"]


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    err = error_of(httpx.get(server.url + "/v1/nothing"), 404)
    assert err["type"] == "not_found_error"
    error_of(httpx.get(server.url + "/v1/completions"), 405)
    err = error_of(httpx.post(server.url + "/v1/completions", content=b"\xff\xfe{", headers={
        "content-type": "application/json"}), 400)
    assert err["message"]


CHAT = {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path, extra, status, param, words", [
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, 422, "response_format", "'json_object' is not"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools",
     "tool calling is not supported"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, 422, "functions", "tool calling is not supported"),
    ("/v1/chat/completions", {"top_logprobs": 3}, 422, "top_logprobs", "needs logprobs set to true"),
    ("/v1/chat/completions", {"min_tokens": 5}, 422, "min_tokens", "more than max_tokens 2"),
    ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, 422, "logit_bias", "'abc' is not a token id"),
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, 422, "logit_bias", "outside -100 to 100"),
    ("/v1/chat/completions", {"logit_bias": {"999999": 1}}, 400, "logit_bias", "holds token id 999999"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [999999]}, 400, "stop_token_ids", "holds token id 999999"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 17}, 400, "min_tokens", "more than the 16 tokens"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 422, "top_k", "greater than or equal to -1"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 422, "repetition_penalty", "greater than 0"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 422, "presence_penalty", "less than or equal to 2"),
])
def test_sampling_options_not_done_or_out_of_range_are_refused_naming_the_field(server, path, extra, status, param,
                                                                                 words):
    body = {**CHAT, **extra} if path.endswith("chat/completions") else {"model": "base", **extra}
    err = error_of(httpx.post(server.url + path, json=body), status)
    assert err["param"] == param and words in err["message"], err
    assert "Value error" not in err["message"]


def test_max_completion_tokens_is_the_chat_length_limit(server):
    """OpenAI's current name for a chat's max_tokens is honoured (over max_tokens, as vLLM takes it)."""
    for extra, expected in (({"max_completion_tokens": 1}, 1), ({"max_completion_tokens": 3, "max_tokens": 5}, 3)):
        body = {**CHAT, "ignore_eos": True, **extra}
        body.pop("max_tokens") if "max_tokens" not in extra else None
        answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == expected, answer
    for bad in (0, -1, "x", 1.5, True):
        err = error_of(httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_completion_tokens": bad}),
                       422)
        assert "max_completion_tokens must be an integer of at least 1" in err["message"], err


def test_what_is_allowed_beside_them_is_answered(server):
    for extra in ({"response_format": {"type": "text"}}, {"tools": [{"type": "function"}], "tool_choice": "none"},
                  {"functions": [{"name": "f"}], "function_call": "none"},
                  {"top_logprobs": 2, "logprobs": True}, {"top_k": 0, "min_p": 0.0, "min_tokens": 2}):
        assert httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **extra}).status_code == 200, extra
