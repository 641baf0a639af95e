"""vLLM's scoring routes, for an adapter trained on pairs of texts (``lorakit train --text-column first,second``):
a relevance or similarity model, e.g. a reranker per domain on one base.

- ``POST /v1/score {"model", "text_1", "text_2"}`` (also vLLM's ``/score``): one score per pair; ``text_1`` and
  ``text_2`` each a text or a list (one text against a list is paired with each, two lists element by element):
  ``{"data": [{"index", "object": "score", "score"}], "usage"}``.
- ``POST /v1/rerank {"model", "query", "documents", "top_n"?}`` (also ``/rerank``, ``/v2/rerank``): the
  documents by score, highest first: ``{"results": [{"index", "document": {"text"}, "relevance_score"}]}``.

A pair's score is what its adapter was trained to give: a regression's number (``--task regress``, a head of one
output) as it is, or a two-class classifier's probability of its second class in class order (``1`` of ``0``/``1``,
``yes`` of ``no``/``yes``, ``relevant`` of ``irrelevant``/``relevant``). An adapter of more classes, or one
trained on single texts, is a 400: ``/v1/classify`` gives every class. The answers come from
:meth:`lorakit.serve.service.Service.classify`, so queueing, batching and per-row adapters are the classifier's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import Field, field_validator

from lorakit.serve import schemas
from lorakit.serve.service import CLASSIFY, LimitError, Service

Texts = schemas.Text | Annotated[list[schemas.Text], Field(min_length=1)]


class ScoreRequest(schemas._Request):
    """vLLM's POST /score body."""

    model: schemas.Text = Field(default="base", min_length=1)
    text_1: Texts
    text_2: Texts

    @field_validator("text_1", "text_2")
    @classmethod
    def _non_empty(cls, value):
        texts = [value] if isinstance(value, str) else value
        if any(not text.strip() for text in texts):
            raise ValueError("a text is empty; give some words to score")
        return value


class RerankRequest(schemas._Request):
    """vLLM's (and Cohere's) POST /rerank body."""

    model: schemas.Text = Field(default="base", min_length=1)
    query: schemas.Text = Field(min_length=1)
    documents: list[schemas.Text] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=0, description="the best n; 0 or none: every document")


def pairs_of(first, second) -> list[list[str]]:
    """``[first, second]`` pairs as vLLM pairs ``text_1`` with ``text_2`` (a 400 for two lists of other lengths)."""
    if isinstance(first, str) and isinstance(second, str):
        return [[first, second]]
    if isinstance(first, str):
        return [[first, text] for text in second]
    if isinstance(second, str):
        raise LimitError("text_1 is a list but text_2 one text; give text_1 one text and text_2 a list, or two "
                         "lists of one length", "text_2")
    if len(first) != len(second):
        raise LimitError(f"text_1 has {len(first)} texts but text_2 {len(second)}; two lists are paired element "
                         "by element, so give them one length", "text_2")
    return [[a, b] for a, b in zip(first, second)]


def pair_scores(outputs: list[list[float]], labels: list[str] | None, adapter: str) -> list[float]:
    """Each pair's score from :meth:`Service.classify`'s outputs (see the module's note)."""
    if labels is None:
        return [row[0] for row in outputs]
    if len(labels) == 2:
        return [row[1] for row in outputs]
    raise LimitError(f"{adapter!r} has {len(labels)} classes, so no one score per pair; scoring takes an adapter "
                     "of one output (--task regress) or two classes; /v1/classify gives every class", "model")


def routes(service: Service) -> APIRouter:
    router = APIRouter()

    async def scored(pairs: list[list[str]], adapter: str, request: Request) -> tuple[list[float], int]:
        request.state.adapter = adapter
        service.require_task(CLASSIFY)
        await service.ensure_model(adapter)
        outputs, labels, tokens = await service.classify(pairs, adapter)
        return pair_scores(outputs, labels, adapter), tokens

    @router.post("/v1/score")
    async def score(body: ScoreRequest, request: Request):
        values, tokens = await scored(pairs_of(body.text_1, body.text_2), body.model, request)
        return {"id": schemas.new_id("score"), "object": "list", "created": schemas.now(), "model": body.model,
                "data": [{"index": i, "object": "score", "score": v} for i, v in enumerate(values)],
                "usage": schemas.usage(tokens, 0)}

    @router.post("/v1/rerank")
    async def rerank(body: RerankRequest, request: Request):
        values, tokens = await scored([[body.query, d] for d in body.documents], body.model, request)
        order = sorted(range(len(values)), key=lambda i: -values[i])[:body.top_n or None]
        return {"id": schemas.new_id("rerank"), "model": body.model, "usage": {"total_tokens": tokens},
                "results": [{"index": i, "document": {"text": body.documents[i]}, "relevance_score": values[i]}
                            for i in order]}

    return router
