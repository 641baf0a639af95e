"""The server on the real embedded chat model (SmolLM2-135M-Instruct): its chat template,
its byte-level tokenizer, a rank-8 adapter on every linear layer of its blocks. Run
in-process (TestClient) to keep it quick; greedy answers must equal what lorakit's
ordinary forward with that adapter active generates alone."""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from lorakit.serve.app import create_app
from lorakit.serve.service import build_service
from lorakit.serve.toy import write_random_adapter

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def one_thread():
    """Batch-1 decoding of a 135M model on a shared 2-core machine: one thread is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
