"""vLLM's /tokenize and /detokenize on a real server: the ids are those the generation routes
give the model (their usage counts them), the text comes back, and the API key guards them."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import PROMPTS, Server, error_of, make_toy

KEY = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("tokens"), 1)
    with Server(["--model", str(toy["model_dir"]), "--adapter", f"task0={toy['root'] / 'task0'}", "--api-key", "k"],
                toy["tmp"] / "tokens.log") as srv:
        yield srv, toy


def _post(url: str, path: str, body: dict, headers=KEY) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def test_tokenize_gives_the_ids_the_generation_routes_use(server):
    srv, toy = server
    got = _post(srv.url, "/tokenize", {"model": "task0", "prompt": PROMPTS[0], "return_token_strs": True}).json()
    assert got["tokens"] == toy["tokenizer"].encode(PROMPTS[0]) and got["count"] == len(got["tokens"])
    assert got["token_strs"] == toy["tokenizer"].convert_ids_to_tokens(got["tokens"]) and got["max_model_len"] > 0
    used = _post(srv.url, "/v1/completions", {"model": "task0", "prompt": PROMPTS[0], "max_tokens": 1}).json()
    assert used["usage"]["prompt_tokens"] == got["count"]
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = _post(srv.url, "/tokenize", {"messages": messages}).json()
    used = _post(srv.url, "/v1/chat/completions", {"model": "base", "messages": messages, "max_tokens": 1}).json()
    assert used["usage"]["prompt_tokens"] == chat["count"] and chat["token_strs"] is None
    back = _post(srv.url, "/detokenize", {"model": "base", "tokens": got["tokens"]}).json()
    assert back == {"prompt": toy["tokenizer"].decode(got["tokens"])}


def test_bad_token_requests_are_refused_in_openai_shape(server):
    srv, _ = server
    assert error_of(_post(srv.url, "/tokenize", {"model": "nope", "prompt": "x"}), 404)["param"] == "model"
    assert "either prompt" in error_of(_post(srv.url, "/tokenize", {}), 422)["message"]
    assert error_of(_post(srv.url, "/detokenize", {"tokens": [10**9]}), 400)["param"] == "tokens"
    for path in ("/tokenize", "/detokenize"):
        assert error_of(_post(srv.url, path, {"prompt": "x", "tokens": [1]}, headers={}), 401)["code"] == \
            "missing_api_key"


def test_model_cards_and_tokenize_give_one_context_and_the_version_is_open(server):
    from lorakit import __version__

    srv, _ = server
    context = _post(srv.url, "/tokenize", {"prompt": "x"}).json()["max_model_len"]
    cards = httpx.get(srv.url + "/v1/models", headers=KEY).json()["data"]
    assert [card["max_model_len"] for card in cards] == [context, context]
    assert httpx.get(srv.url + "/version").json() == {"version": __version__}
