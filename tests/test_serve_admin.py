"""vLLM's adapter routes with vLLM's request bodies, on a real server on loopback: the
status codes and bodies of vLLM's current release (plain-text successes, errors as
``{"error": {"message", "type", "param", "code": <status>}}``), names such as
``org/name``, in-place reloads, and the same confinement to ``--adapter-root``."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import PROMPTS, Server, complete, error_of, make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("admin"), 3)


@pytest.fixture(scope="module")
def server(toy):
    with Server(["--model", str(toy["model_dir"]), "--adapter-root", str(toy["root"])], toy["tmp"] / "admin.log") as srv:
        yield srv


def _vllm_error(response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == status and "param" in error
    return error["message"]


def _answer(url: str, model: str) -> str:
    return complete(url, model, PROMPTS[4], 6)["choices"][0]["text"]


def test_load_use_reload_in_place_and_unload_as_vllm_answers(server, toy):
    url, root, refs, tokenizer = server.url, toy["root"], toy["refs"], toy["tokenizer"]
    expected = {name: refs.text(root / name, tokenizer.encode(PROMPTS[4]), 6) for name in ("task0", "task1")}
    load = {"lora_name": "org/sql", "lora_path": str(root / "task0")}  # vLLM's clients send absolute paths
    answer = httpx.post(url + "/v1/load_lora_adapter", json=load)
    assert answer.status_code == 200 and answer.text == "Success: LoRA adapter 'org/sql' added successfully."
    assert _answer(url, "org/sql") == expected["task0"]
    assert "org/sql" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}

    message = _vllm_error(httpx.post(url + "/v1/load_lora_adapter", json=load), 400, "InvalidUserInput")
    assert message == ("The lora adapter 'org/sql' has already been loaded. If you want to load the adapter in "
                       "place, set 'load_inplace' to True.")
    inplace = {"lora_name": "org/sql", "lora_path": "task1", "load_inplace": True}
    assert httpx.post(url + "/v1/load_lora_adapter", json=inplace).status_code == 200
    assert _answer(url, "org/sql") == expected["task1"]

    answer = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "org/sql"})
    assert answer.status_code == 200 and answer.text == "Success: LoRA adapter 'org/sql' removed successfully."
    error_of(httpx.post(url + "/v1/completions", json={"model": "org/sql", "prompt": "x"}), 404)
    message = _vllm_error(httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "org/sql"}), 404,
                          "NotFoundError")
    assert message == "The lora adapter 'org/sql' cannot be found."


def test_vllm_errors_for_missing_fields_paths_and_bad_files(server, toy):
    url = server.url
    for body in ({}, {"lora_name": "x"}, {"lora_name": "", "lora_path": "task0"}):
        message = _vllm_error(httpx.post(url + "/v1/load_lora_adapter", json=body), 400, "InvalidUserInput")
        assert message == "Both 'lora_name' and 'lora_path' must be provided."
    message = _vllm_error(httpx.post(url + "/v1/unload_lora_adapter", json={}), 400, "InvalidUserInput")
    assert message == "'lora_name' needs to be provided to unload a LoRA adapter."
    message = _vllm_error(httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "nope"}),
                          404, "NotFoundError")
    assert message == "Loading lora x failed: No adapter found for nope"
    _vllm_error(httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}), 403,
                "PermissionError")
    message = _vllm_error(httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "broken"}),
                          400, "BadRequestError")
    assert str(toy["root"]) not in message
    _vllm_error(httpx.post(url + "/v1/load_lora_adapter", content=b"[1,2", headers={"content-type": "application/json"}),
                400, "BadRequestError")
    # a name UTF-8 cannot carry (a lone surrogate, as JSON allows) is echoed escaped, a long one cut: never a 500
    lone = b'{"lora_name": "x\\ud800"}'
    message = _vllm_error(httpx.post(url + "/v1/unload_lora_adapter", content=lone,
                                     headers={"content-type": "application/json"}), 404, "NotFoundError")
    assert message == "The lora adapter 'x\\ud800' cannot be found."
    message = _vllm_error(httpx.post(url + "/v1/load_lora_adapter", content=lone.replace(b"}", b', "lora_path": "n"}'),
                                     headers={"content-type": "application/json"}), 400, "BadRequestError")
    assert message.startswith("adapter name 'x\\ud800' is invalid")
    message = _vllm_error(httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "y" * 100_000}), 404,
                          "NotFoundError")
    assert len(message) < 200 and "(100000 characters)" in message
    assert httpx.get(url + "/health").status_code == 200


def test_lorakit_routes_take_names_with_slashes(server, toy):
    url = server.url
    assert httpx.post(url + "/v1/adapters", json={"name": "team/a:v1", "path": "task2"}).status_code == 201
    assert _answer(url, "team/a:v1") == toy["refs"].text(toy["root"] / "task2", toy["tokenizer"].encode(PROMPTS[4]), 6)
    assert httpx.delete(url + "/v1/adapters/team/a:v1").status_code == 200
    error_of(httpx.delete(url + "/v1/adapters/team/a:v1"), 404)
