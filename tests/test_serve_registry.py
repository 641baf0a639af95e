"""Adapters load only from files under the adapter root, broken ones are refused with
a 4xx whose message names no server path and no internal slot, and the model is left
as it was.

Unit tests drive :class:`AdapterRegistry` on a toy model; the HTTP tests go through a
real server on loopback (where these mistakes used to answer 500 or 201)."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.serve.registry import (AdapterConflict, AdapterForbidden, AdapterLoadError, AdapterRegistry, UnknownAdapter,
                                    check_name)
from lorakit.serve.toy import write_random_adapter
from serve_helpers import PROMPTS, Server, complete, error_of, make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("registry"), 2)


def _model(toy):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy["model_dir"]).eval()


def _lora_names(model) -> set[str]:
    from lorakit.model import lora_configs

    return set(lora_configs(model))


def test_a_folder_whose_files_link_outside_the_root_is_refused(toy, tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    shutil.copytree(toy["root"] / "task0", outside)
    (root / "sneaky").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / name, root / "sneaky" / name)
    (root / "inner").mkdir()  # links that stay inside the root are fine
    shutil.copytree(toy["root"] / "task1", root / "real")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(root / "real" / name, root / "inner" / name)
    model = _model(toy)
    registry = AdapterRegistry(model, adapter_root=root, max_loaded=2)
    with pytest.raises(AdapterForbidden, match="outside the adapter root") as caught:
        registry.register("sneaky", "sneaky")
    assert str(tmp_path) not in str(caught.value)
    assert _lora_names(model) == set() and registry.names() == []
    entry = registry.register("inner", "inner")
    assert entry.slot is not None and registry.names() == ["inner"]


def test_a_fifo_in_place_of_the_weights_is_refused_without_hanging(toy, tmp_path):
    (tmp_path / "fifo").mkdir()
    shutil.copy(toy["root"] / "task0" / "adapter_config.json", tmp_path / "fifo")
    os.mkfifo(tmp_path / "fifo" / "adapter_model.safetensors")
    registry = AdapterRegistry(_model(toy), adapter_root=tmp_path, max_loaded=2)
    with pytest.raises(LorakitError, match="not a regular file"):
        registry.register("fifo", "fifo")


def test_nan_weights_are_refused_at_load_and_leave_the_model_unchanged(toy, tmp_path):
    shutil.copytree(toy["root"] / "task0", tmp_path / "nan")
    tensors = load_file(str(tmp_path / "nan" / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan" / "adapter_model.safetensors"))
    model = _model(toy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    registry = AdapterRegistry(model, adapter_root=tmp_path, max_loaded=2)
    with pytest.raises(AdapterLoadError, match="NaN or infinite weights") as caught:
        registry.register("nan", "nan")
    assert "'nan'" in str(caught.value) and "serve" not in str(caught.value)
    assert _lora_names(model) == set()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_adapter_for_another_kind_of_model_is_refused_by_its_task_type(toy, tmp_path):
    """A PEFT file for a token classifier (or a seq2seq LM) is not served on a causal LM, in one line."""
    shutil.copytree(toy["root"] / "task0", tmp_path / "tagger")
    config_file = tmp_path / "tagger" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "task_type": "TOKEN_CLS"}))
    registry = AdapterRegistry(_model(toy), adapter_root=tmp_path, max_loaded=2)
    with pytest.raises(AdapterLoadError, match="is a PEFT adapter of task_type 'TOKEN_CLS'"):
        registry.register("tagger", "tagger")
    registry.register("plain", toy["root"] / "task0", trusted=True)  # a causal LM's adapter still loads


def test_replacing_an_adapter_keeps_the_old_one_when_the_new_files_fail(toy, tmp_path):
    for name in ("task0", "task1", "broken"):
        shutil.copytree(toy["root"] / name, tmp_path / name)
    registry = AdapterRegistry(_model(toy), adapter_root=tmp_path, max_loaded=2)
    old = registry.register("a", "task0")
    with pytest.raises(AdapterConflict):
        registry.register("a", "task1")
    with pytest.raises(AdapterLoadError):
        registry.register("a", "broken", replace=True)
    assert registry._entries["a"] is old and old.slot is not None
    new = registry.register("a", "task1", replace=True)
    assert registry._entries["a"] is new and old.slot is None and new.slot is not None


def test_a_broken_adapter_never_evicts_another_users_resident_one(toy, tmp_path):
    for name in ("task0", "task1"):
        shutil.copytree(toy["root"] / name, tmp_path / name)
    shutil.copytree(toy["root"] / "task1", tmp_path / "cut")
    weights = tmp_path / "cut" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    registry = AdapterRegistry(_model(toy), adapter_root=tmp_path, max_loaded=1)
    resident = registry.register("a", "task0")
    with pytest.raises(AdapterLoadError, match="'cut'"):
        registry.register("cut", "cut")
    assert resident.slot is not None and registry.is_resident("a")
    later = registry.register("b", "task1", load=False)  # registered, not resident
    shutil.copyfile(weights, tmp_path / "task1" / "adapter_model.safetensors")  # its files break meanwhile
    with pytest.raises(AdapterLoadError):
        registry.acquire("b")
    assert resident.slot is not None and later.slot is None


def test_a_request_queued_when_its_adapter_is_removed_loads_it_again_on_demand(toy, tmp_path):
    shutil.copytree(toy["root"] / "task0", tmp_path / "task0")
    model = _model(toy)
    registry = AdapterRegistry(model, adapter_root=tmp_path, max_loaded=2, load_on_demand=True)
    slot = registry.ensure("task0").slot  # the request's check on arrival: registered from its folder
    weights = {k: v.clone() for k, v in model.state_dict().items() if slot in k}
    registry.unregister("task0")  # DELETE while the request waits for the engine
    assert not registry.knows("task0") and not _lora_names(model)
    entry = registry.acquire("task0")  # admitted: loaded again, as a request arriving now would be
    assert entry.pins == 1 and registry.is_resident("task0") and entry.loads == 1
    again = {k.replace(entry.slot, slot): v for k, v in model.state_dict().items() if entry.slot in k}
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    plain = AdapterRegistry(_model(toy), adapter_root=tmp_path, max_loaded=2)  # without load on demand
    plain.register("task0", "task0")
    plain.unregister("task0")
    with pytest.raises(UnknownAdapter):
        plain.acquire("task0")
    with pytest.raises(LorakitError, match="--load-on-demand needs --adapter-root"):
        AdapterRegistry(None, load_on_demand=True)


def test_a_missing_adapter_root_is_one_clear_error():
    with pytest.raises(LorakitError, match="--adapter-root /nonexistent does not exist"):
        AdapterRegistry(None, adapter_root="/nonexistent")


@pytest.fixture(scope="module")
def server(toy):
    root = toy["root"]
    os.symlink(root / "loop", root / "loop")  # a symlink loop
    rank = root / "rank"  # a config that says rank 4 for factors of rank 8
    shutil.copytree(root / "task0", rank)
    config = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with Server(["--model", str(toy["model_dir"]), "--adapter-root", str(root)], toy["tmp"] / "registry.log") as srv:
        yield srv


def test_unusable_paths_answer_4xx_naming_no_server_path(server, toy):
    root = str(toy["root"])
    cases = {"loop": 400, "loop/x": 400, "a\x00b": 400, "x" * 5000: 422, "y" * 300: 400, "deep/" * 800 + "x": 400,
             "/etc": 403, "../model": 403, "missing": 400, "broken": 400, "rank": 400}
    for path, status in cases.items():
        err = error_of(httpx.post(server.url + "/v1/adapters", json={"name": "probe", "path": path}), status)
        assert root not in err["message"] and str(toy["tmp"]) not in err["message"], (path, err)
    err = error_of(httpx.post(server.url + "/v1/adapters", json={"name": "probe", "path": "rank"}), 400)
    assert "'probe'" in err["message"] and "serve" not in err["message"], err["message"]
    assert "rank" in err["message"]
    # the server and its model are unharmed
    assert complete(server.url, "base", PROMPTS[0], 4)["choices"][0]["text"] == toy["refs"].text(
        None, toy["tokenizer"].encode(PROMPTS[0]), 4)
    assert httpx.post(server.url + "/v1/adapters", json={"name": "task0", "path": "task0"}).status_code == 201
    err = error_of(httpx.post(server.url + "/v1/adapters", json={"name": "task0", "path": "task1"}), 409)
    assert root not in err["message"]


def test_nan_weights_over_http_are_refused(server, toy):
    shutil.copytree(toy["root"] / "task1", toy["root"] / "nan")
    file = toy["root"] / "nan" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors = {k: torch.full_like(v, float("inf")) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, str(file))
    err = error_of(httpx.post(server.url + "/v1/adapters", json={"name": "nan", "path": "nan"}), 400)
    assert "NaN or infinite" in err["message"]
    assert "nan" not in {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}


def test_adapter_names_are_checked():
    assert check_name("sql-v1.2_x") == "sql-v1.2_x"
    assert check_name("org/name:v2") == "org/name:v2"  # names vLLM's clients use
    for bad in ["", "a b", "x" * 129, "../etc", "é", "/abs", "-x"]:
        with pytest.raises(LorakitError, match="invalid"):
            check_name(bad)
    with pytest.raises(AdapterConflict, match="reserved"):
        check_name("base")


def _adapter_dir(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_adapter_paths_must_lie_under_the_root_even_through_symlinks(tmp_path):
    root = tmp_path / "root"
    inside = _adapter_dir(root / "sql")
    outside = _adapter_dir(tmp_path / "elsewhere")
    os.symlink(outside, root / "sneaky")
    registry = AdapterRegistry(model=None, adapter_root=root, max_loaded=2)
    assert registry.resolve_path("sql") == inside.resolve()
    assert registry.resolve_path(str(inside)) == inside.resolve()
    for bad in ["../elsewhere", str(outside), "sneaky", "/etc"]:
        with pytest.raises(AdapterForbidden, match="outside the adapter root"):
            registry.resolve_path(bad)
    with pytest.raises(LorakitError, match="not a folder"):
        registry.resolve_path("missing")
    (root / "empty").mkdir()
    with pytest.raises(LorakitError, match="no adapter_config.json"):
        registry.resolve_path("empty")


def test_without_a_root_only_command_line_paths_are_allowed(tmp_path):
    folder = _adapter_dir(tmp_path / "a")
    registry = AdapterRegistry(model=None, adapter_root=None, max_loaded=1)
    assert registry.resolve_path(folder, trusted=True) == folder.resolve()
    with pytest.raises(AdapterForbidden, match="--adapter-root"):
        registry.resolve_path(folder)


def test_command_line_adapters_are_read_from_the_current_folder_or_the_root(tmp_path, monkeypatch):
    """`serve --adapter sql=adapters/sql --adapter-root adapters` (the README's example) works:
    the operator's own paths are taken as given, then under the root; HTTP paths stay confined."""
    root = tmp_path / "adapters"
    sql = _adapter_dir(root / "sql")
    elsewhere = _adapter_dir(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    registry = AdapterRegistry(model=None, adapter_root=root, max_loaded=2)
    assert registry.resolve_path("adapters/sql", trusted=True) == sql.resolve()
    assert registry.resolve_path("sql", trusted=True) == sql.resolve()
    assert registry.resolve_path(str(elsewhere), trusted=True) == elsewhere.resolve()
    with pytest.raises(AdapterForbidden, match="outside the adapter root"):
        registry.resolve_path(str(elsewhere))


def test_a_load_error_names_the_resident_adapters_it_meets_by_their_names(toy, tmp_path):
    """A DoRA adapter cannot join layers that hold a LoRA adapter with a bias on B: the refusal names
    the adapter there as the client knows it ('task0'), never its slot inside the model."""
    for name, key, extra, value in (("dora", ".lora_magnitude_vector", {"use_dora": True}, torch.ones),
                                    ("task0", ".lora_B.bias", {"lora_bias": True}, torch.zeros)):
        shutil.copytree(toy["root"] / "task0", tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **extra}))
        tensors = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        for b in [k for k in tensors if k.endswith(".lora_B.weight")]:
            tensors[b.replace(".lora_B.weight", key)] = value(tensors[b].shape[0])
        save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
    model = _model(toy)
    registry = AdapterRegistry(model, adapter_root=tmp_path, max_loaded=4)
    registry.register("task0", "task0")
    with pytest.raises(AdapterLoadError) as caught:
        registry.register("my-dora", "dora")
    message = str(caught.value)
    assert "'my-dora'" in message and "['task0']" in message and "serve" not in message, message
    assert len(_lora_names(model)) == 1 and registry.names() == ["task0"]  # the model as it was
