"""The service behind the routes. Loading adapters on their first request
(``--load-on-demand``), on a real server on loopback: 16 concurrent first requests for one adapter load it once and all get its
answer; names that are not folders under the root stay 404; a folder that links outside
the root is refused; the LRU keeps at most ``--max-loaded`` resident. And ``POST /v1/classify``
on a classification model: label and probabilities per text, with per-request adapters (LoRA on
query/value plus a per-adapter classifier head), checked against the same adapter run through
lorakit's ordinary (non-per-row) forward."""

from __future__ import annotations

import asyncio
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from serve_helpers import PROMPTS, Server, error_of, make_toy
from tiny_models import tiny_bert_classifier

from lorakit.serve.app import create_app
from lorakit.serve.service import CLASSIFY, build_service


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


TEXTS = ["a fine film", "dull and slow", "the quick brown fox"]


def test_a_chat_template_given_to_the_server_renders_the_chats(toy, tmp_path):
    """--chat-template chatml (or an adapter folder that carries a template) replaces the
    tokenizer's own; a chat's ids are then ChatML's, the turns ended by the end-of-sequence
    token (this vocabulary has no <|im_end|>), which ends an answer."""
    from lorakit import chat_templates
    from lorakit.errors import LorakitError

    messages = [{"role": "user", "content": "Hello there"}]
    service = build_service(str(toy["model_dir"]), chat_template="chatml")
    text = "<|im_start|>user\nHello there<|endoftext|>\n<|im_start|>assistant\n"
    assert service.encode_chat(messages) == toy["tokenizer"].encode(text, add_special_tokens=False)
    assert service.engine.eos_ids == {toy["tokenizer"].eos_token_id}
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / chat_templates.FILE).write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    service = build_service(str(toy["model_dir"]), chat_template=str(tmp_path / "adapter"))
    assert service.encode_chat(messages) == toy["tokenizer"].encode("Hello there|", add_special_tokens=False)
    with pytest.raises(LorakitError, match="'nope.jinja' is neither a template name"):
        build_service(str(tmp_path / "no-such-model"), chat_template="nope.jinja")  # before the model loads
    # a template that refuses some chats (a system message here) answers those requests with a 400, not a 500
    (tmp_path / "strict.jinja").write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                                           "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}|"
                                           "{% endfor %}")
    service = build_service(str(toy["model_dir"]), chat_template=str(tmp_path / "strict.jinja"))
    from lorakit.serve.service import LimitError

    with pytest.raises(LimitError, match=r"cannot render these messages \(TemplateError: no system role\)") as caught:
        service.encode_chat([{"role": "system", "content": "be brief"}, *messages])
    assert caught.value.param == "messages"


def test_an_adapter_trained_with_a_chat_template_is_served_with_it(toy, tmp_path):
    """An adapter that carries chat_template.jinja renders its chats with it, as given on the
    command line and loaded on demand from under the root (the file copied with the weights);
    other adapters and the base keep the server's; /tokenize counts what the chat is given.
    Where its template writes ChatML's end of turn as one token, its answers end there, a
    chat's and a completion's alike."""
    from lorakit import chat_templates

    root = tmp_path / "root"
    for name in ("templated", "plain", "chatml"):
        shutil.copytree(toy["root"] / "task0", root / name)
    (root / "templated" / chat_templates.FILE).write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    chatml = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    (root / "chatml" / chat_templates.FILE).write_text(chatml)
    messages = [{"role": "user", "content": "Hello there"}]
    own = toy["tokenizer"].encode(toy["tokenizer"].apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=False), add_special_tokens=False)
    mine = toy["tokenizer"].encode("<<Hello there>>", add_special_tokens=False)
    service = build_service(str(toy["model_dir"]), adapters={"cli": str(root / "templated")}, adapter_root=str(root),
                            load_on_demand=True)
    assert service.encode_chat(messages, adapter="cli") == mine
    assert service.encode_chat(messages, adapter="base") == service.encode_chat(messages) == list(own)
    # a vocabulary that holds <|im_end|> as one token (the model given a row for it)
    service.tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    service.model.resize_token_embeddings(len(service.tokenizer))
    im_end = service.tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced = {"prompt": "Hello there", "max_tokens": 3, "temperature": 0, "logit_bias": {str(im_end): 100}}
    with TestClient(create_app(service)) as client:
        for model, want in (("templated", mine), ("plain", list(own)), ("cli", mine)):
            tokens = client.post("/tokenize", json={"model": model, "messages": messages}).json()["tokens"]
            answer = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 2,
                                                              "temperature": 0}).json()
            assert tokens == want and answer["usage"]["prompt_tokens"] == len(want), (model, answer)
        ended = client.post("/v1/completions", json={"model": "chatml", **forced}).json()
        plain = client.post("/v1/completions", json={"model": "plain", **forced}).json()
        kept = client.post("/v1/completions", json={"model": "chatml", "ignore_eos": True, **forced}).json()
        chat = client.post("/v1/chat/completions", json={"model": "chatml", "messages": messages,
                                                         **{k: v for k, v in forced.items() if k != "prompt"}}).json()
    assert service.turn_end_ids("chatml") == {im_end}
    assert service.turn_end_ids("cli") == service.turn_end_ids("base") == frozenset()
    for answer, want in ((ended, ("stop", 1)), (chat, ("stop", 1)), (plain, ("length", 3)), (kept, ("length", 3))):
        assert (answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]) == want, answer

def _word_tokenizer(folder, pairs: bool = False):
    """A word-level tokenizer of TEXTS' words; ``pairs``: with BERT's template, [CLS] a [SEP] b [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in TEXTS for w in text.split()} | {"more", "words"})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if pairs:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                        model_input_names=["input_ids", "attention_mask",
                                                           *(["token_type_ids"] if pairs else [])])
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from lorakit.config import LoraConfig
    from lorakit.io import save_adapter
    from lorakit.model import attach

    tmp = tmp_path_factory.mktemp("classify")
    model = tiny_bert_classifier(num_labels=3)
    model.config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp / "model")
    _word_tokenizer(tmp / "model")
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]), "mood")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # the adapter's A, B and its classifier copy
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_adapter(model, tmp / "adapters" / "mood", "mood")
    return tmp, model


def test_classify_answers_labels_and_probabilities_per_adapter(classifier):
    tmp, reference = classifier
    service = build_service(str(tmp / "model"), adapters={"mood": str(tmp / "adapters" / "mood")}, max_loaded=2)
    assert service.task == CLASSIFY
    with TestClient(create_app(service)) as client:
        answers = {m: client.post("/v1/classify", json={"model": m, "input": TEXTS}).json() for m in ("base", "mood")}
        single = client.post("/v1/classify", json={"model": "mood", "input": TEXTS[0]}).json()
        vllm_path = client.post("/classify", json={"model": "mood", "input": TEXTS}).json()  # vLLM's path
        assert client.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 400
        assert client.post("/v1/classify", json={"model": "nope", "input": "x"}).status_code == 404
        assert client.post("/v1/classify", json={"model": "mood", "input": []}).status_code == 422
        for empty in ("", ["fine", "  "]):
            refused = client.post("/v1/classify", json={"model": "mood", "input": empty})
            assert refused.status_code == 422 and "is empty; give some words" in refused.json()["error"]["message"]
    from lorakit.model import disable_adapters, set_active

    batch = service.tokenizer(TEXTS, padding=True, return_tensors="pt")
    set_active(reference, "mood")
    with torch.no_grad():
        expected = {"mood": torch.softmax(reference(**batch).logits, -1)}
        with disable_adapters(reference):
            expected["base"] = torch.softmax(reference(**batch).logits, -1)
    labels = ["neg", "neutral", "pos"]
    prompt_tokens = int(batch["attention_mask"].sum())
    for model_name, answer in answers.items():
        assert answer["model"] == model_name and len(answer["data"]) == len(TEXTS)
        assert answer["object"] == "list" and answer["id"].startswith("classify-") and answer["created"] > 0
        assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                                   "total_tokens": prompt_tokens}
        for i, (row, probs) in enumerate(zip(answer["data"], expected[model_name])):
            got = torch.tensor([row["probabilities"][label] for label in labels])
            assert torch.allclose(got, probs, atol=1e-5), (model_name, row)
            assert row["label"] == labels[int(probs.argmax())] and row["index"] == i
            assert row["probs"] == [row["probabilities"][label] for label in labels] and row["num_classes"] == 3
    assert [row["probs"] for row in vllm_path["data"]] == [row["probs"] for row in answers["mood"]["data"]]
    assert not torch.allclose(expected["mood"], expected["base"], atol=1e-3)  # the adapter matters
    one = torch.tensor([single["data"][0]["probabilities"][label] for label in labels])
    assert torch.allclose(one, expected["mood"][0], atol=1e-5)  # a batch of one agrees with the batch


def test_a_head_with_dropout_and_an_adapter_with_dropout_classify_as_peft_evaluates(tmp_path):
    """A RoBERTa head (dropout inside the saved classifier) and an adapter with lora_dropout: the served
    probabilities are PEFT's in eval mode, the same every time (what is loaded into the serving model
    is in its eval mode)."""
    peft = pytest.importorskip("peft")
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=40, num_labels=3, pad_token_id=0)
    RobertaForSequenceClassification(config).save_pretrained(tmp_path / "model")
    _word_tokenizer(tmp_path / "model")
    theirs = peft.get_peft_model(RobertaForSequenceClassification.from_pretrained(tmp_path / "model"), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], lora_dropout=0.3))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    theirs.save_pretrained(tmp_path / "drop")
    theirs.eval()
    service = build_service(str(tmp_path / "model"), adapters={"drop": str(tmp_path / "drop")})
    batch = service.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    with TestClient(create_app(service)) as client:
        for _ in range(2):
            answer = client.post("/v1/classify", json={"model": "drop", "input": TEXTS}).json()
            got = torch.tensor([list(row["probabilities"].values()) for row in answer["data"]])
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_an_adapter_with_a_bias_on_b_is_served_as_it_computes(classifier, tmp_path):
    """PEFT's lora_bias: served beside a plain adapter, each answers as the model with it alone does."""
    from lorakit.config import LoraConfig
    from lorakit.io import save_adapter
    from lorakit.model import add_adapter, set_active

    tmp, reference = classifier
    add_adapter(reference, LoraConfig(r=4, alpha=8, target_modules=["query", "value", "dense"], lora_bias=True,
                                      init="kaiming", modules_to_save=["classifier"]), "biased")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".biased." in name or name.endswith(".biased"):  # its A, B, B's bias and classifier copy
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_adapter(reference, tmp_path / "biased", "biased")
    service = build_service(str(tmp / "model"), max_loaded=2,
                            adapters={"mood": str(tmp / "adapters" / "mood"), "biased": str(tmp_path / "biased")})
    with TestClient(create_app(service)) as client:
        answers = {m: client.post("/v1/classify", json={"model": m, "input": TEXTS}).json() for m in ("mood", "biased")}
    batch = service.tokenizer(TEXTS, padding=True, return_tensors="pt")
    for name, answer in answers.items():
        set_active(reference, name)
        with torch.no_grad():
            expected = torch.softmax(reference(**batch).logits, -1)
        got = torch.tensor([[row["probabilities"][label] for label in ("neg", "neutral", "pos")]
                            for row in answer["data"]])
        assert torch.allclose(got, expected, atol=1e-5), name
    set_active(reference, "mood")


def test_an_adapter_answers_with_the_labels_it_was_trained_with(classifier, tmp_path):
    """``lorakit_task.json`` beside the adapter names its classes, as ``lorakit predict`` reads them."""
    import json
    import shutil

    tmp, _ = classifier
    root = tmp_path / "adapters"
    shutil.copytree(tmp / "adapters" / "mood", root / "mood")
    labels = ["sad", "flat", "happy"]
    (root / "mood" / "lorakit_task.json").write_text(json.dumps(
        {"task": "classify", "method": "lora", "model": str(tmp / "model"), "labels": labels, "max_length": 16}))
    service = build_service(str(tmp / "model"), adapter_root=str(root), max_loaded=2)
    with TestClient(create_app(service)) as client:
        assert client.post("/v1/adapters", json={"name": "mood", "path": "mood"}).status_code == 201
        mood = client.post("/v1/classify", json={"model": "mood", "input": TEXTS}).json()["data"]
        base = client.post("/v1/classify", json={"model": "base", "input": TEXTS}).json()["data"]
        surrogate = client.post("/v1/classify", content=b'{"model": "mood", "input": ["ok", "\\ud800"]}',
                                headers={"content-type": "application/json"})
    assert all(row["label"] in labels and set(row["probabilities"]) == set(labels) for row in mood)
    assert all(row["label"] in ("neg", "neutral", "pos") for row in base)
    assert surrogate.status_code == 422 and "surrogate" in surrogate.json()["error"]["message"]


def _adapter_with_its_head(folder, base, outputs: int, seed: int, target: str, task: dict):
    """A LoRA adapter (random factors) with a head of ``outputs`` saved beside it, on the encoder of the 3-class
    ``classifier`` base, written to ``folder`` with the ``lorakit_task.json`` of ``task``; returns the model."""
    import json

    from lorakit.config import LoraConfig
    from lorakit.io import save_adapter
    from lorakit.model import attach

    model = tiny_bert_classifier(num_labels=outputs, seed=seed)
    model.load_state_dict({k: v for k, v in tiny_bert_classifier(num_labels=3).state_dict().items()
                           if not k.startswith("classifier.")}, strict=False)  # the same encoder as the base
    attach(model, LoraConfig(r=4, alpha=8, target_modules=[target], modules_to_save=["classifier"]), folder.name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_adapter(model, folder, folder.name)
    (folder / "lorakit_task.json").write_text(json.dumps(
        {"method": "lora", "model": str(base), "max_length": 16, **task}))
    return model


def _served_beside_mood(tmp, root, name: str):
    """``(answers of adapter name, answers of the 3-class "mood", the tokenized TEXTS)`` from a server on the
    ``classifier`` base loading the adapters of ``root`` (with "mood" copied there) on demand."""
    shutil.copytree(tmp / "adapters" / "mood", root / "mood")
    service = build_service(str(tmp / "model"), adapter_root=str(root), max_loaded=2, load_on_demand=True)
    with TestClient(create_app(service)) as client:
        answers = {m: client.post("/v1/classify", json={"model": m, "input": TEXTS}).json()["data"]
                   for m in (name, "mood")}
    return answers[name], answers["mood"], service.tokenizer(TEXTS, padding=True, return_tensors="pt")


def test_adapters_of_other_label_sets_share_one_base(classifier, tmp_path):
    """One server, one 3-class base: an adapter trained for 5 classes of its own answers with its
    5 labels through its own head, as a 5-class model with it would, beside the 3-class adapter."""
    tmp, _ = classifier
    root = tmp_path / "adapters"
    labels = ["art", "film", "food", "sport", "tech"]
    five = _adapter_with_its_head(root / "topic", tmp / "model", len(labels), 5, "query",
                                  {"task": "classify", "labels": labels})
    topic, mood, batch = _served_beside_mood(tmp, root, "topic")
    with torch.no_grad():
        expected = torch.softmax(five(**batch).logits, -1)
    for row, probs in zip(topic, expected):
        assert list(row["probabilities"]) == labels
        assert torch.allclose(torch.tensor([row["probabilities"][label] for label in labels]), probs, atol=1e-5)
    assert all(set(row["probabilities"]) == {"neg", "neutral", "pos"} for row in mood)


def test_a_regression_adapter_answers_its_number_beside_a_classifier(classifier, tmp_path):
    """An adapter whose head has one output (``lorakit train --task regress``; transformers' num_labels=1)
    answers each text's number, as a one-output model with it computes, beside the 3-class adapter."""
    tmp, _ = classifier
    root = tmp_path / "adapters"
    one = _adapter_with_its_head(root / "score", tmp / "model", 1, 7, "value", {"task": "regress", "labels": None})
    score, mood, batch = _served_beside_mood(tmp, root, "score")
    with torch.no_grad():
        expected = one(**batch).logits[:, 0]
    assert [set(row) for row in score] == [{"index", "value"}] * len(TEXTS)
    assert torch.allclose(torch.tensor([row["value"] for row in score]), expected, atol=1e-5)
    assert all(set(row["probabilities"]) == {"neg", "neutral", "pos"} for row in mood)


def test_a_gpt2_classifier_adapter_answers_as_lorakit_predict(tmp_path):
    """The server reads a text as predict does: cut to the adapter's training length, ids and mask
    only (GPT-2 adds token_type_ids through its word embeddings, so passing them changes answers)."""
    import json

    from transformers import BertTokenizer, GPT2Config, GPT2ForSequenceClassification

    from lorakit.config import LoraConfig
    from lorakit.inference import load_trained, predict
    from lorakit.io import save_adapter
    from lorakit.model import attach
    from tiny_training import BERT_VOCAB

    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(BERT_VOCAB)}, model_max_length=64)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(BERT_VOCAB), n_embd=32, n_layer=2, n_head=4,
                                                     n_positions=64, num_labels=2,
                                                     pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    attach(model, LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["score"]), "mood")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_adapter(model, tmp_path / "mood", "mood")
    (tmp_path / "mood" / "lorakit_task.json").write_text(json.dumps(
        {"task": "classify", "method": "lora", "model": str(tmp_path / "model"), "labels": ["neg", "pos"],
         "max_length": 6}))
    texts = [" ".join(BERT_VOCAB[5:8]), " ".join(BERT_VOCAB[5:20])]  # the second is cut to 6 tokens
    expected = list(predict(load_trained([tmp_path / "mood"]), texts).values())[0]
    service = build_service(str(tmp_path / "model"), adapters={"mood": str(tmp_path / "mood")}, task=CLASSIFY)
    with TestClient(create_app(service)) as client:
        served = client.post("/v1/classify", json={"model": "mood", "input": texts}).json()["data"]
    for want, got in zip(expected, served):
        assert got["label"] == want["label"]
        for label in ("neg", "pos"):
            assert abs(got["probabilities"][label] - want["probabilities"][label]) < 1e-5


def test_an_adapter_with_trainable_tokens_is_served_as_peft_computes_it(toy, tmp_path):
    """PEFT's trainable_token_indices (rows of the embedding and of the head, per adapter): the server's
    greedy answers equal PEFT's own model with the adapter, beside a plain adapter on the same base."""
    pytest.importorskip("peft")

    tokenizer = toy["tokenizer"]
    prompts = PROMPTS[:3]
    tokens = sorted({tokenizer.encode(p)[-1] for p in prompts} | {tokenizer.encode(" fox")[0]})
    theirs = peft_adapter(toy, tmp_path / "tokens", 6, lambda name: 2.0 if "lm_head" in name else 0.5,
                          target_modules=["q_proj", "v_proj"],
                          trainable_token_indices={"embed_tokens": tokens, "lm_head": tokens})

    def greedy(prompt: str) -> str:
        return greedy_text(theirs, tokenizer, prompt, 8)

    service = build_service(str(toy["model_dir"]), max_loaded=2,
                            adapters={"tokens": str(tmp_path / "tokens"), "task0": str(toy["root"] / "task0")})
    with TestClient(create_app(service)) as client:
        for prompt in prompts:
            assert served_text(client, "tokens", prompt, 8) == greedy(prompt)
            assert served_text(client, "task0", prompt, 8) == toy["refs"].text(toy["root"] / "task0",
                                                                                tokenizer.encode(prompt), 8)
    with theirs.disable_adapter():
        plain = [greedy(p) for p in prompts]
    assert [greedy(p) for p in prompts] != plain  # the token rows change the answers


def test_an_adapter_saving_the_embedding_and_head_whole_is_served_beside_others(toy, tmp_path):
    """PEFT's modules_to_save of embed_tokens and lm_head (a copy of each per adapter): the server's
    greedy answers equal PEFT's, and the base and another adapter still answer as before (the
    wrapped embedding once made every request fail)."""
    pytest.importorskip("peft")

    tokenizer, prompts = toy["tokenizer"], PROMPTS[:3]
    theirs = peft_adapter(toy, tmp_path / "saved", 7, lambda name: 0.5 if "lora_" in name else 0.05,
                          target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    service = build_service(str(toy["model_dir"]), max_loaded=2,
                            adapters={"saved": str(tmp_path / "saved"), "task0": str(toy["root"] / "task0")})
    with TestClient(create_app(service)) as client:
        for prompt in prompts:
            assert served_text(client, "saved", prompt, 8) == greedy_text(theirs, tokenizer, prompt, 8)
            assert served_text(client, "task0", prompt, 8) == toy["refs"].text(toy["root"] / "task0",
                                                                                tokenizer.encode(prompt), 8)
            assert served_text(client, "base", prompt, 8) == toy["refs"].text(None, tokenizer.encode(prompt), 8)
        answer = client.post("/v1/completions", json={"model": "base", "prompt": [10 ** 6], "max_tokens": 1})
        assert answer.status_code == 400 and "vocabulary" in answer.json()["error"]["message"]


def test_a_dora_adapter_is_served_beside_lora_adapters_on_the_same_layers(toy, tmp_path):
    """A DoRA adapter joins layers that hold LoRA adapters (loaded before and after it): each answers
    as PEFT computes it alone (the per-row batches of both kinds: tests/test_layers_dora.py)."""
    pytest.importorskip("peft")

    tokenizer, prompts = toy["tokenizer"], PROMPTS[:3]
    theirs = peft_adapter(toy, tmp_path / "dora", 8, lambda name: 0.5 if "lora_" in name else 0.05,
                          target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True)
    service = build_service(str(toy["model_dir"]), max_loaded=3, adapters={
        "task0": str(toy["root"] / "task0"), "dora": str(tmp_path / "dora"), "task1": str(toy["root"] / "task1")})
    with TestClient(create_app(service)) as client:
        for prompt in prompts:
            assert served_text(client, "dora", prompt, 8) == greedy_text(theirs, tokenizer, prompt, 8)
            for name in ("task0", "task1"):
                assert served_text(client, name, prompt, 8) == toy["refs"].text(toy["root"] / name,
                                                                                 tokenizer.encode(prompt), 8)
        # unloaded, the DoRA adapter leaves LoRA layers behind, which still answer as their adapters do
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "dora"}).status_code == 200
        assert served_text(client, "task0", prompts[0], 8) == toy["refs"].text(toy["root"] / "task0",
                                                                               tokenizer.encode(prompts[0]), 8)
        assert not any(type(m).__name__ == "DoraLinear" for m in service.registry.model.modules())


def peft_adapter(toy, folder, seed: int, scale, **config):
    """PEFT's own adapter (r=4, ``config``) on the toy model, every trainable tensor moved by seeded noise of
    ``scale(name)``, saved in ``folder``; the PEFT model, in eval mode."""
    import peft
    from transformers import AutoModelForCausalLM

    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(toy["model_dir"]), peft.LoraConfig(r=4, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale(name))
    theirs.save_pretrained(folder)
    return theirs.eval()


def greedy_text(model, tokenizer, prompt: str, n: int) -> str:
    """``model``'s greedy continuation of ``prompt`` (at most ``n`` tokens, no cache), decoded."""
    ids, new = torch.tensor([tokenizer.encode(prompt)]), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return tokenizer.decode(new, skip_special_tokens=True)


def served_text(client, model: str, prompt: str, n: int) -> str:
    """The server's greedy completion of ``prompt`` by ``model`` (an adapter name or "base")."""
    answer = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                  "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def test_an_adapter_trained_on_pairs_of_texts_classifies_tab_separated_pairs(classifier, tmp_path):
    """An adapter whose lorakit_task.json says it was trained on pairs (sentence1, sentence2): each input is
    'first<TAB>second', tokenized as a pair as in training (with its segment ids); a single text is a 400
    naming the form."""
    import json

    from lorakit.model import set_active

    tmp, reference = classifier
    folder, model_dir = tmp_path / "pairs", tmp_path / "model"
    shutil.copytree(tmp / "adapters" / "mood", folder)
    shutil.copytree(tmp / "model", model_dir)
    _word_tokenizer(model_dir, pairs=True)
    (folder / "lorakit_task.json").write_text(json.dumps({"task": "classify", "labels": ["neg", "neutral", "pos"],
                                                          "pairs": True}))
    service = build_service(str(model_dir), max_loaded=2, adapters={"pairs": str(folder)})
    firsts, seconds = TEXTS[:2], [TEXTS[2], TEXTS[0]]
    with TestClient(create_app(service)) as client:
        answer = client.post("/v1/classify", json={"model": "pairs", "input": [f"{a}\t{b}" for a, b in
                                                                               zip(firsts, seconds)]})
        single = client.post("/v1/classify", json={"model": "pairs", "input": TEXTS[0]})
        listed = client.post("/v1/classify", json={"model": "pairs", "input": [list(p) for p in zip(firsts, seconds)]})
        to_base = client.post("/v1/classify", json={"model": "base", "input": [[firsts[0], seconds[0]]]})
        three = client.post("/v1/classify", json={"model": "pairs", "input": [["a", "b", "c"]]})
    assert answer.status_code == 200, answer.text
    assert listed.json()["data"] == answer.json()["data"]  # a [first, second] list is the same pair
    assert "classifies single texts" in error_of(to_base, 400)["message"]
    assert three.status_code == 422
    assert "classifies pairs of texts" in error_of(single, 400)["message"]
    set_active(reference, "mood")
    batch = service.tokenizer(firsts, seconds, padding=True, return_tensors="pt")
    assert batch["token_type_ids"].sum() > 0  # the second texts' segment
    with torch.no_grad():
        expected = torch.softmax(reference(**batch).logits, -1)
    got = torch.tensor([[row["probabilities"][label] for label in ("neg", "neutral", "pos")]
                        for row in answer.json()["data"]])
    assert torch.allclose(got, expected, atol=1e-5)
    joined = service.tokenizer([f"{a} {b}" for a, b in zip(firsts, seconds)], padding=True, return_tensors="pt")
    with torch.no_grad():  # read as one text each, the answers would differ
        alone = torch.softmax(reference(**joined).logits, -1)
    assert not torch.allclose(alone, expected, atol=1e-3)


def test_a_mixture_of_experts_adapter_on_parameters_is_served_beside_others(toy, tmp_path):
    """A PEFT adapter on fused expert weights (target_parameters) once made every request fail
    (per-row batches refused it); now each adapter's answers equal PEFT's own greedy decoding, and
    the base and a plain adapter answer beside it."""
    peft = pytest.importorskip("peft")
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = toy["tokenizer"]
    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2,
                                            eos_token_id=tokenizer.eos_token_id)).eval()
    base.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    made = {}
    for name, config in {"experts": dict(target_modules=[], target_parameters=["experts.gate_up_proj",
                                                                                "experts.down_proj", "gate.weight"]),
                         "attention": dict(target_modules=["q_proj", "v_proj"])}.items():
        model = peft.get_peft_model(MixtralForCausalLM.from_pretrained(tmp_path / "moe"),
                                    peft.LoraConfig(r=4, init_lora_weights=False, **config))
        generator = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        model.save_pretrained(tmp_path / name)
        made[name] = model.eval()

    service = build_service(str(tmp_path / "moe"), max_loaded=2,
                            adapters={name: str(tmp_path / name) for name in made})
    with TestClient(create_app(service)) as client:
        for prompt in PROMPTS[:2]:
            for name, model in made.items():
                assert served_text(client, name, prompt, 6) == greedy_text(model, tokenizer, prompt, 6)
            assert served_text(client, "base", prompt, 6) == greedy_text(base, tokenizer, prompt, 6)
    # the experts' adapter changes answers
    assert greedy_text(made["experts"], tokenizer, PROMPTS[0], 6) != greedy_text(base, tokenizer, PROMPTS[0], 6)


def test_an_activated_adapter_is_served_as_peft_generates_it(toy, tmp_path):
    """An aLoRA (alora_invocation_tokens) among the server's rows: prompts holding its invocation are
    answered as PEFT's generate answers them (the adapter from the invocation on, the generated tokens
    too), prompts without it as the base; a plain adapter decodes beside it in the same batches."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    tokenizer = toy["tokenizer"]
    invocation = tokenizer.encode(" fox")[-1:]
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(toy["model_dir"]), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=invocation, init_lora_weights=False,
        task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for _, p in sorted(theirs.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.6)
    theirs.save_pretrained(tmp_path / "alora")
    theirs.eval()

    def generate(prompt: str) -> str:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    prompts = ["the quick brown fox", "a fox and a dog said", "the lazy dog"]  # invoked, invoked, not
    service = build_service(str(toy["model_dir"]), max_loaded=2,
                            adapters={"alora": str(tmp_path / "alora"), "task0": str(toy["root"] / "task0")})
    with TestClient(create_app(service)) as client:
        def ask(model, prompt):
            return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                        "temperature": 0})

        with ThreadPoolExecutor(6) as pool:  # the rows decode together
            answers = list(pool.map(lambda mp: ask(*mp), [(m, p) for p in prompts for m in ("alora", "task0")]))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        texts = [a.json()["choices"][0]["text"] for a in answers]
        for i, prompt in enumerate(prompts):
            assert texts[2 * i] == generate(prompt)
            assert texts[2 * i + 1] == toy["refs"].text(toy["root"] / "task0", tokenizer.encode(prompt), 8)
    assert texts[4] == toy["refs"].text(None, tokenizer.encode(prompts[2]), 8)  # not invoked: the base
    assert texts[0] != toy["refs"].text(None, tokenizer.encode(prompts[0]), 8)  # invoked: not the base


def test_a_language_model_given_only_classifier_adapters_is_served_to_classify(tmp_path):
    """A classifier trained on a language model's body (`lorakit train --model FILE.gguf`) is served without
    --task classify; one generating adapter among them keeps the model generating."""
    import json

    from lorakit.serve.service import CLASSIFY, GENERATE, detect_task
    from tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "lm")
    for name, task_type in (("cls", "SEQ_CLS"), ("chat", "CAUSAL_LM")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": task_type}))
    lm = str(tmp_path / "lm")
    assert detect_task(lm) == GENERATE
    assert detect_task(lm, {"a": str(tmp_path / "cls"), "b": str(tmp_path / "cls")}) == CLASSIFY
    assert detect_task(lm, {"a": str(tmp_path / "cls"), "b": str(tmp_path / "chat")}) == GENERATE
    assert detect_task("default") == CLASSIFY
