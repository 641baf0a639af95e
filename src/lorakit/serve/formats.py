"""OpenAI's response objects for the generation routes, whole and streamed, and the classifier route's answer.

``text_completion`` for ``/v1/completions`` and ``chat.completion`` /
``chat.completion.chunk`` for ``/v1/chat/completions``, with ``n`` choices (each chunk
names its choice by ``index``), log-probabilities in each route's own layout, and the
usage chunk a client asks for with ``stream_options.include_usage`` (a last chunk with no
choices, before ``data: [DONE]``).
"""

from __future__ import annotations

from typing import Callable

from lorakit.serve import schemas
from lorakit.serve.sampling import TokenLogprob


class _Format:
    """What the two routes share: ids, usage, and turning token ids into text."""

    object_whole = object_chunk = ""

    def __init__(self, model: str, token_text: Callable[[int], str], logprobs: bool, include_usage: bool = False):
        self.model, self.token_text, self.logprobs, self.include_usage = model, token_text, logprobs, include_usage
        self.id, self.created = schemas.new_id(self.id_prefix), schemas.now()

    id_prefix = "cmpl"

    def _base(self, obj: str) -> dict:
        base = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.include_usage and obj == self.object_chunk:
            base["usage"] = None  # OpenAI sends usage: null on every chunk but the last
        return base

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._base(self.object_chunk), "choices": [],
                "usage": schemas.usage(prompt_tokens, completion_tokens)}

    def whole(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._base(self.object_whole), "choices": choices,
                "usage": schemas.usage(prompt_tokens, completion_tokens)}


class CompletionFormat(_Format):
    """``text_completion`` objects; logprobs as ``{tokens, token_logprobs, top_logprobs, text_offset}``."""

    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offsets: dict[int, int] = {}  # characters streamed so far, per choice

    def heads(self, n: int) -> list[dict]:
        return []

    def chunk(self, index: int, text: str | None, entries: list[TokenLogprob], finish_reason: str | None = None) -> dict:
        choice = {"index": index, "text": text or "", "logprobs": self._logprobs(index, entries),
                  "finish_reason": finish_reason}
        return {**self._base(self.object_chunk), "choices": [choice]}

    def choice(self, index: int, text: str, entries: list[TokenLogprob], finish_reason: str) -> dict:
        self.offsets[index] = 0
        return {"index": index, "text": text, "logprobs": self._logprobs(index, entries), "finish_reason": finish_reason}

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self.token_text(e.token) for e in entries]
        offsets, at = [], self.offsets.get(index, 0)
        for token in tokens:
            offsets.append(at)
            at += len(token)
        self.offsets[index] = at
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else {self.token_text(t): lp for t, lp in e.top}
                                 for e in entries],
                "text_offset": offsets}


class ChatFormat(_Format):
    """``chat.completion`` objects and ``chat.completion.chunk`` deltas; logprobs as ``{content: [...]}``."""

    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, *args, role: str = "assistant", **kwargs):
        super().__init__(*args, **kwargs)
        self.role = role  # the answer's: the assistant's, or the last message's when it is continued

    def heads(self, n: int) -> list[dict]:
        """The first chunk of each choice: the answer's role, no text yet."""
        return [{**self._base(self.object_chunk),
                 "choices": [{"index": i, "delta": {"role": self.role, "content": ""}, "logprobs": None,
                              "finish_reason": None}]} for i in range(n)]

    def chunk(self, index: int, text: str | None, entries: list[TokenLogprob], finish_reason: str | None = None) -> dict:
        delta = {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(entries), "finish_reason": finish_reason}
        return {**self._base(self.object_chunk), "choices": [choice]}

    def choice(self, index: int, text: str, entries: list[TokenLogprob], finish_reason: str) -> dict:
        return {"index": index, "message": {"role": self.role, "content": text}, "logprobs": self._logprobs(entries),
                "finish_reason": finish_reason}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._token(e.token, e.logprob), "top_logprobs": [self._token(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def _token(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}


def classified(model: str, outputs: list[list[float]], labels: list[str] | None, prompt_tokens: int) -> dict:
    """The answer of ``POST /v1/classify`` (and of vLLM's ``POST /classify``, the same body): for each text
    its ``index``, ``label``, ``probs`` in class order and ``num_classes``, as vLLM answers, and
    ``probabilities`` by class name; for a regression adapter (``labels`` None) its number, ``value``."""
    if labels is None:
        data = [{"index": i, "value": row[0]} for i, row in enumerate(outputs)]
    else:
        data = [{"index": i, "label": labels[max(range(len(row)), key=row.__getitem__)], "probs": row,
                 "num_classes": len(row), "probabilities": dict(zip(labels, row))} for i, row in enumerate(outputs)]
    return {"id": schemas.new_id("classify"), "object": "list", "created": schemas.now(), "model": model,
            "data": data, "usage": schemas.usage(prompt_tokens, 0)}
