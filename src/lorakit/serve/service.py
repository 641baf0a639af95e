"""Everything one server holds: the base model, its adapters, the engine, the limits.

:func:`build_service` is the library call behind ``lorakit serve``: it loads the model,
registers the adapters, and returns a :class:`Service` that the HTTP routes
(:mod:`lorakit.serve.app`) talk to. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.serve.engine import Engine, Event, GenerationRequest
from lorakit.serve.registry import BASE, AdapterRegistry
from lorakit.serve.sampling import Sampler

GENERATE, CLASSIFY = "generate", "classify"


class LimitError(LorakitError):
    """A request exceeds one of the server's limits; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class Limits:
    """Caps on what one request may ask for.

    Attributes:
        max_prompt_tokens: longest prompt, in tokens.
        max_tokens: most tokens one request may generate.
        context: the model's context window (prompt + answer), in tokens.
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    context: int = 2048


class Service:
    """The model, tokenizer, adapter registry and engine of one server."""

    def __init__(self, model, tokenizer, task: str, model_name: str, registry: AdapterRegistry,
                 engine: Engine, limits: Limits):
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.model_name = model_name
        self.registry = registry
        self.engine = engine
        self.limits = limits
        self.stopped = False

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        """Finish the requests already accepted, then stop the engine."""
        self.engine.stop()
        self.stopped = True

    # ---- prompts ----------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return self._check_prompt(self.tokenizer.encode(prompt), "prompt")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat through the tokenizer's chat template, ready for the answer."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # a plain fallback for tokenizers that ship no template
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._check_prompt(self.tokenizer.encode(text, add_special_tokens=False), "messages")

    def _check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise LimitError(f"{param} is empty: it has no tokens", param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"{param} has {len(ids)} tokens; this server takes at most "
                             f"{self.limits.max_prompt_tokens}", param)
        return ids

    def check_max_tokens(self, prompt_ids: list[int], max_tokens: int) -> int:
        if max_tokens > self.limits.max_tokens:
            raise LimitError(f"max_tokens is {max_tokens}; this server generates at most "
                             f"{self.limits.max_tokens} tokens per request", "max_tokens")
        room = self.limits.context - len(prompt_ids)
        if max_tokens > room:
            raise LimitError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                             f"model's context of {self.limits.context} tokens", "max_tokens")
        return max_tokens

    # ---- work -------------------------------------------------------------------------
    def require_task(self, task: str) -> None:
        if self.task != task:
            raise LimitError(f"this server runs a {self.task} model ({self.model_name}); "
                             f"start it with a {task} model for this route", "model")

    def submit(self, prompt_ids: list[int], adapter: str, max_tokens: int, sampler: Sampler,
               stop: list[str]) -> tuple[GenerationRequest, asyncio.Queue]:
        """Queue a generation; its events arrive on the returned asyncio queue."""
        self.registry.check_known(adapter)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        request = GenerationRequest(prompt_ids=prompt_ids, adapter=adapter, max_tokens=max_tokens,
                                    on_event=deliver, sampler=sampler, stop=stop)
        self.engine.submit(request)
        return request, events

    async def classify(self, texts: list[str], adapter: str) -> list[dict]:
        """Label and class probabilities for each text, with ``adapter`` ("base" for none)."""
        self.registry.check_known(adapter)
        if len(texts) > 64:
            raise LimitError(f"input has {len(texts)} texts; send at most 64 per request", "input")
        future = self.engine.call(lambda: self._classify_now(texts, adapter))
        return await asyncio.wrap_future(future)

    def _classify_now(self, texts: list[str], adapter: str) -> list[dict]:
        from lorakit.per_row import per_row_adapters

        entry = None
        if adapter != BASE:
            entry = self.registry.acquire(adapter)
            if entry is None:
                raise LorakitError(f"all {self.registry.max_loaded} resident adapters are busy; retry shortly")
        try:
            batch = self.tokenizer(texts, padding=True, truncation=True,
                                   max_length=self.limits.max_prompt_tokens, return_tensors="pt")
            with torch.inference_mode(), per_row_adapters(self.model, [entry.slot if entry else None] * len(texts)):
                logits = self.model(**batch).logits
        finally:
            if entry is not None:
                self.registry.release(entry)
        probs = torch.softmax(logits.float(), dim=-1)
        id2label = self.model.config.id2label
        return [
            {"index": i, "label": id2label[int(row.argmax())],
             "probabilities": {id2label[j]: float(p) for j, p in enumerate(row)}}
            for i, row in enumerate(probs)
        ]

    async def add_adapter(self, name: str, path: str) -> dict:
        """Load an adapter over HTTP (its path must lie under the adapter root)."""
        entry = await asyncio.wrap_future(self.engine.call(lambda: self.registry.register(name, path)))
        load_ms = None if entry.last_load_s is None else round(entry.last_load_s * 1000, 2)
        return {"id": entry.name, "object": "model", "parent": BASE, "resident": entry.slot is not None,
                "load_ms": load_ms}

    async def remove_adapter(self, name: str) -> dict:
        self.registry.check_known(name)
        if name == BASE:
            raise LimitError("the base model cannot be removed", "name")
        await asyncio.wrap_future(self.engine.call(lambda: self.registry.unregister(name)))
        return {"id": name, "object": "model", "deleted": True}


def detect_task(spec: str) -> str:
    """``generate`` or ``classify`` for a ``--model`` value: "default" is the embedded
    classifier, "default-chat" the chat model; a folder says so in its config.json."""
    if spec == "default":
        return CLASSIFY
    if spec == "default-chat":
        return GENERATE
    config = Path(spec).expanduser() / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
            return CLASSIFY
    return GENERATE


def _folder_labels(spec: str) -> dict | None:
    """The ``id2label`` a model folder's config.json records (so its head keeps its size)."""
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return None
    labels = json.loads(config.read_text()).get("id2label")
    return {int(k): v for k, v in labels.items()} if labels else None


def build_service(model: str = "default-chat", adapters: dict[str, str] | None = None,
                  adapter_root: str | None = None, max_loaded: int = 8, max_batch: int = 32,
                  max_prompt_tokens: int = 2048, max_tokens: int = 512, task: str | None = None,
                  quantize: str | None = None) -> Service:
    """Load ``model``, register ``adapters`` ({name: folder}) and build the engine (not started).
    ``quantize`` (``"nf4"``, ``"int8"``) stores the base's linear weights quantized (:mod:`lorakit.quantize`).

    Raises:
        LorakitError: a bad model spec, adapter name, path or file.
    """
    from lorakit.models import load_causal_lm, load_classifier

    task = task or detect_task(model)
    if task == CLASSIFY:
        base, tokenizer = load_classifier(model, id2label=_folder_labels(model))
    else:
        base, tokenizer = load_causal_lm(model)
    if quantize:
        from lorakit.quantize import quantize_base

        quantize_base(base, quantize)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    context = int(getattr(base.config, "max_position_embeddings", None) or 2048)
    limits = Limits(max_prompt_tokens=min(max_prompt_tokens, context), max_tokens=max_tokens, context=context)
    registry = AdapterRegistry(base, adapter_root=adapter_root, max_loaded=max_loaded)
    for name, path in (adapters or {}).items():
        registry.register(name, path, trusted=True, load=True)
    engine = Engine(base, tokenizer, registry, max_batch=max_batch)
    return Service(base, tokenizer, task, model, registry, engine, limits)
