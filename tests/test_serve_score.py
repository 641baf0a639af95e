"""vLLM's scoring routes (`POST /v1/score`, `POST /v1/rerank`, at vLLM's paths too) over adapters trained on pairs
of texts: each score is what the adapter's own model answers for the pair (a regression's number, a two-class
classifier's probability of its second class), the reranking orders by it, and what cannot be scored is a 400."""

from __future__ import annotations

import shutil

import torch
from fastapi.testclient import TestClient

from lorakit.serve.app import create_app
from lorakit.serve.service import build_service
from serve_helpers import error_of
from test_serve_service import TEXTS, _adapter_with_its_head, _word_tokenizer, classifier  # noqa: F401 (a fixture)

QUERY = "a fine film"
DOCUMENTS = ["dull and slow", "the quick brown fox", "a fine fox", "slow film"]


def test_pair_adapters_score_and_rerank_as_their_models_answer(classifier, tmp_path):  # noqa: F811
    tmp, _ = classifier
    model_dir, root = tmp_path / "model", tmp_path / "adapters"
    shutil.copytree(tmp / "model", model_dir)
    _word_tokenizer(model_dir, pairs=True)
    made = {name: _adapter_with_its_head(root / name, model_dir, outputs, seed, target, {**task, "pairs": True})
            for name, outputs, seed, target, task in [
                ("relevance", 1, 7, "value", {"task": "regress", "labels": None}),
                ("yes", 2, 8, "query", {"task": "classify", "labels": ["no", "yes"]}),
                ("three", 3, 9, "value", {"task": "classify", "labels": ["a", "b", "c"]})]}
    shutil.copytree(tmp / "adapters" / "mood", root / "mood")  # trained on single texts
    service = build_service(str(model_dir), adapter_root=str(root), max_loaded=4, load_on_demand=True)
    batch = service.tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, padding=True, truncation=True, max_length=16,
                              return_tensors="pt")
    with torch.no_grad():
        expected = {"relevance": made["relevance"](**batch).logits[:, 0],
                    "yes": torch.softmax(made["yes"](**batch).logits, -1)[:, 1]}
    with TestClient(create_app(service)) as client:
        for name, want in expected.items():
            scored = client.post("/v1/score", json={"model": name, "text_1": QUERY, "text_2": DOCUMENTS})
            assert scored.status_code == 200, scored.text
            scored = scored.json()
            assert scored["object"] == "list" and scored["id"].startswith("score-") and scored["model"] == name
            assert [row["object"] for row in scored["data"]] == ["score"] * len(DOCUMENTS)
            assert torch.allclose(torch.tensor([row["score"] for row in scored["data"]]), want, atol=1e-5)
            assert scored["usage"]["prompt_tokens"] == int(batch["attention_mask"].sum())
            zipped = client.post("/score", json={"model": name, "text_1": [QUERY] * len(DOCUMENTS),
                                                 "text_2": DOCUMENTS}).json()  # vLLM's path, two lists
            assert [row["score"] for row in zipped["data"]] == [row["score"] for row in scored["data"]]
            one = client.post("/v1/score", json={"model": name, "text_1": QUERY, "text_2": DOCUMENTS[2]}).json()
            assert abs(one["data"][0]["score"] - float(want[2])) < 1e-5  # a pair alone as in the batch
            ranked = client.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCUMENTS,
                                                     "top_n": 2}).json()
            order = torch.argsort(want, descending=True).tolist()
            assert [row["index"] for row in ranked["results"]] == order[:2]
            assert [row["document"]["text"] for row in ranked["results"]] == [DOCUMENTS[i] for i in order[:2]]
            assert torch.allclose(torch.tensor([row["relevance_score"] for row in ranked["results"]]),
                                  want[order[:2]], atol=1e-5)
            every = client.post("/v2/rerank", json={"model": name, "query": QUERY, "documents": DOCUMENTS}).json()
            assert [row["index"] for row in every["results"]] == order
        assert "3 classes" in error_of(client.post("/v1/score", json={"model": "three", "text_1": QUERY,
                                                                      "text_2": DOCUMENTS}), 400)["message"]
        assert "classifies single texts" in error_of(client.post("/v1/rerank", json={
            "model": "mood", "query": QUERY, "documents": DOCUMENTS}), 400)["message"]
        assert "text_1 has 2 texts but text_2 4" in error_of(client.post("/v1/score", json={
            "model": "relevance", "text_1": [QUERY, QUERY], "text_2": DOCUMENTS}), 400)["message"]
        assert client.post("/v1/rerank", json={"model": "relevance", "query": QUERY, "documents": []}).status_code == 422
        assert client.post("/v1/score", json={"model": "relevance", "text_1": " ", "text_2": "x"}).status_code == 422
        metrics = client.get("/metrics").text
    assert 'lorakit_requests_total{adapter="relevance",endpoint="/v1/score",status="200"}' in metrics
