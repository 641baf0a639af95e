"""API keys and the Host header, on a real server on loopback, with httpx and the
official OpenAI client: 401 without a key and with a wrong one (OpenAI's error shape),
the admin key alone loads and unloads adapters, /health and /metrics stay open, and a
request naming a foreign Host (DNS rebinding) is refused."""

from __future__ import annotations

import httpx
import openai
import pytest

from lorakit.serve.auth import Access, AccessMiddleware, allowed_hosts, host_name
from serve_helpers import PROMPTS, Server, complete, error_of, make_toy

KEY, ADMIN = "sk-test-123", "admin-456"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("auth"), 2)
    with Server(["--model", str(toy["model_dir"]), "--adapter-root", str(toy["root"]), "--admin-key", ADMIN,
                 "--allowed-hosts", "lorakit.internal"], toy["tmp"] / "auth.log", env={"LORAKIT_API_KEY": KEY}) as srv:
        yield srv


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_v1_route_needs_the_key(server):
    url = server.url
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/adapters"), ("POST", "/v1/load_lora_adapter"),
                         ("POST", "/classify"), ("POST", "/v1/score"), ("POST", "/rerank")]:  # vLLM's paths too
        for headers in ({}, _bearer("wrong"), {"Authorization": KEY}):
            err = error_of(httpx.request(method, url + path, headers=headers, json={}), 401)
            assert err["type"] == "invalid_request_error" and err["code"] in ("missing_api_key", "invalid_api_key")
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/v1/models", headers=_bearer(KEY)).status_code == 200
    complete(url, "base", PROMPTS[0], 3, headers=_bearer(KEY))
    complete(url, "base", PROMPTS[0], 3, headers=_bearer(ADMIN))  # the admin key works everywhere


def test_the_openai_client_with_and_without_the_key(server):
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="base", prompt=PROMPTS[1], max_tokens=3).choices[0].text is not None
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.status_code == 401 and "not valid" in caught.value.body["message"]


def test_only_the_admin_key_loads_and_unloads_adapters(server):
    url = server.url
    body = {"name": "task0", "path": "task0"}
    err = error_of(httpx.post(url + "/v1/adapters", json=body, headers=_bearer(KEY)), 403)
    assert "admin key" in err["message"]
    assert httpx.post(url + "/v1/adapters", json=body, headers=_bearer(ADMIN)).status_code == 201
    error_of(httpx.delete(url + "/v1/adapters/task0", headers=_bearer(KEY)), 403)
    vllm = {"lora_name": "t1", "lora_path": "task1"}
    error_of(httpx.post(url + "/v1/load_lora_adapter", json=vllm, headers=_bearer(KEY)), 403)
    assert httpx.post(url + "/v1/load_lora_adapter", json=vllm, headers=_bearer(ADMIN)).status_code == 200
    assert httpx.delete(url + "/v1/adapters/task0", headers=_bearer(ADMIN)).status_code == 200


def test_a_foreign_host_header_is_refused(server):
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.2"):
        err = error_of(httpx.get(server.url + "/v1/models", headers={**_bearer(KEY), "Host": host}), 400)
        assert err["code"] == "invalid_host"
    error_of(httpx.get(server.url + "/health", headers={"Host": "evil.example"}), 400)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "lorakit.internal", f"LoraKit.Internal:{port}"):
        assert httpx.get(server.url + "/v1/models", headers={**_bearer(KEY), "Host": host}).status_code == 200, host


def test_host_names_and_key_rules():
    assert host_name("[::1]:8000") == "::1" and host_name("a.b:1") == "a.b" and host_name("A.B") == "a.b"
    assert allowed_hosts("0.0.0.0", ["*"]) is None
    assert allowed_hosts("10.0.0.5", ["x.y"]) == {"10.0.0.5", "localhost", "127.0.0.1", "::1", "x.y"}
    check = AccessMiddleware(None, Access(api_key="k", hosts=None)).check
    scope = {"path": "/v1/models", "method": "GET", "headers": [(b"authorization", b"Bearer k")]}
    assert check(scope) is None
    assert check({**scope, "headers": [(b"authorization", b"Bearer kk")]})[0] == 401
    assert check({**scope, "path": "/health", "headers": []}) is None
    open_admin = AccessMiddleware(None, Access(admin_key="a")).check  # no API key: only admin routes closed
    assert open_admin({**scope, "headers": []}) is None
    assert open_admin({"path": "/v1/adapters/x", "method": "DELETE", "headers": []})[0] == 401
