"""Everything one server holds: the base model, its adapters, the engine, the limits.

:func:`build_service` is the library call behind ``lorakit serve``: it loads the model,
registers the adapters, and returns a :class:`Service` that the HTTP routes
(:mod:`lorakit.serve.app`) talk to. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit import chat_templates
from lorakit.errors import LorakitError
from lorakit.serve.engine import Engine, Event, GenerationRequest
from lorakit.serve.registry import BASE, AdapterRegistry
from lorakit.serve.sampling import Sampler
from lorakit.tasks.classify import model_inputs, model_labels, split_pairs

GENERATE, CLASSIFY = "generate", "classify"


class LimitError(LorakitError):
    """A request exceeds one of the server's limits; ``param`` names the field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class QueueFull(LorakitError):
    """More requests wait than ``--max-queue`` allows (HTTP 429, retry after a second)."""


@dataclass
class Limits:
    """Caps on what one request may ask for, and on the server's queue.

    Attributes:
        max_prompt_tokens: longest prompt, in tokens.
        max_tokens: most tokens one request may generate.
        context: the model's context window (prompt + answer), in tokens.
        max_queue: most requests waiting for a row; more are refused (429).
        request_timeout: seconds a generation may take from the moment it is queued to
            its last token (None: no limit); past it, 504.
        max_body_bytes: largest request body, in bytes; larger ones are refused (413).
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    context: int = 2048
    max_queue: int = 256
    request_timeout: float | None = None
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LorakitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise LorakitError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout}")


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
        self._calls_waiting = 0  # classify calls queued on the engine thread
        self._calls_lock = threading.Lock()

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        """Finish the requests already accepted, then stop the engine."""
        self.engine.stop()
        self.stopped = True

    # ---- prompts (called off the event loop: a long text takes a while) -------------------
    def encode_prompt(self, prompt: str | list[int], check: bool = True) -> list[int]:
        """A text's token ids, or token ids as given (each checked against the vocabulary);
        ``check`` False leaves an empty or over-long prompt to the caller (``/tokenize``)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            return self._check_prompt(ids, "prompt") if check else ids
        self.check_token_ids(prompt, "prompt")
        return self._check_prompt(list(prompt), "prompt")

    def check_token_ids(self, ids, param: str) -> None:
        """Refuse token ids past this model's vocabulary (``param``: the request field holding them)."""
        vocabulary = self.model.get_input_embeddings().num_embeddings
        if ids and max(ids) >= vocabulary:
            raise LimitError(f"{param} holds token id {max(ids)}; this model's vocabulary has ids 0 to "
                             f"{vocabulary - 1}", param)

    def chat_template(self, adapter: str | None) -> str | None:
        """The template of ``adapter``'s chats: the one it was trained with where it carries one
        (``chat_template.jinja``), else the server's (``--chat-template``, or the tokenizer's own)."""
        own = self.registry.chat_template(adapter) if adapter not in (None, BASE) else None
        return own or getattr(self.tokenizer, "chat_template", None)

    def turn_end_ids(self, adapter: str | None) -> frozenset[int]:
        """Tokens that end ``adapter``'s answers (chats and completions) besides the model's end
        tokens: ChatML's end of turn, where the template it was trained with writes it as one token."""
        token = chat_templates.turn_end_id(self.tokenizer, self.chat_template(adapter))
        return frozenset() if token is None or token in self.engine.eos_ids else frozenset({token})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, check: bool = True, adapter: str | None = None) -> list[int]:
        """Token ids of a chat through ``adapter``'s chat template (:meth:`chat_template`), ready
        for the answer: a new assistant turn opened, or (``continue_final_message``) the last
        message left open; ``check`` as for :meth:`encode_prompt`."""
        template = self.chat_template(adapter)
        if template:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          continue_final_message=continue_final_message,
                                                          tokenize=False, chat_template=template)
            except ValueError as err:  # e.g. a final message the template does not render as given
                raise LimitError(f"the messages cannot be continued with this model's chat template: {err}",
                                 "continue_final_message") from None
            except chat_templates.RENDER_ERRORS as err:  # the template refuses these messages (raise_exception)
                raise LimitError(f"the chat template cannot render these messages ({type(err).__name__}: {err})",
                                 "messages") from None
        else:  # a plain fallback for tokenizers that ship no template
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            if continue_final_message:
                text = text[:-1]
            elif add_generation_prompt:
                text += "assistant:"
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self._check_prompt(ids, "messages") if check else ids

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
            raise LimitError(f"this server runs a {self.task} model ({Path(self.model_name).name}); "
                             f"start it with a {task} model for this route", "model")

    async def ensure_model(self, name: str) -> None:
        """Raise :class:`UnknownAdapter` unless ``name`` is served; with load on demand, a
        folder of that name directly under the adapter root is registered (and loaded, when
        a slot is free) first. Concurrent first requests for it load it once: the engine
        thread registers it for the first and finds it registered for the others."""
        if name == BASE or self.registry.knows(name):
            return
        self.check_served(name)
        await asyncio.wrap_future(self.engine.call(lambda: self.registry.ensure(name)))

    def check_served(self, name: str) -> None:
        """Raise :class:`UnknownAdapter` unless ``name`` is the base, a registered adapter, or
        (load on demand) a folder of that name directly under the adapter root."""
        if not (name == BASE or self.registry.knows(name)
                or (self.registry.load_on_demand and self.registry.on_disk(name))):
            raise self.registry.unknown(name)

    def queued(self) -> int:
        """Requests waiting: generations not yet decoding plus classify calls not yet run."""
        return self.engine.queued() + self._calls_waiting

    def queue_full(self) -> str | None:
        """Why no request can wait now (the queue holds ``--max-queue``), or None."""
        return self._full_message() if self.queued() >= self.limits.max_queue else None

    def _full_message(self) -> str:
        return f"the server has {self.queued()} requests waiting (--max-queue {self.limits.max_queue}); retry in a second"

    def check_room(self, count: int = 1) -> None:
        """Raise :class:`QueueFull` when ``count`` more waiting requests would pass --max-queue."""
        if count > self.limits.max_queue:
            raise LimitError(f"the request asks for {count} choices (n for each prompt); this server queues at "
                             f"most {self.limits.max_queue} requests (--max-queue): ask for fewer choices", "n")
        if self.queued() + count > self.limits.max_queue:
            raise QueueFull(self._full_message())

    def submit(self, prompt_ids: list[int] | list[list[int]], adapter: str, max_tokens: int,
               samplers: list[Sampler], stop: list[str], logprobs: int | None = None,
               ignore_eos: bool = False, echo: bool = False,
               stop_ids: frozenset[int] = frozenset()) -> tuple[list[GenerationRequest], asyncio.Queue]:
        """Queue one generation per sampler (``n`` choices); their events arrive on the
        returned asyncio queue as ``(choice index, Event)``. ``prompt_ids`` is one prompt
        for every sampler, or one prompt per sampler (a list of id lists, as long as ``samplers``).

        Raises:
            QueueFull: the waiting requests would pass ``max_queue``.
        """
        self.registry.check_known(adapter)
        self.check_room(len(samplers))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def deliver_to(index: int):
            def deliver(event: Event) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    pass
            return deliver

        per_sampler = bool(prompt_ids) and isinstance(prompt_ids[0], list)
        requests = [GenerationRequest(prompt_ids=prompt_ids[i] if per_sampler else prompt_ids, adapter=adapter,
                                      max_tokens=max_tokens, on_event=deliver_to(i), sampler=sampler, stop=stop,
                                      logprobs=logprobs, ignore_eos=ignore_eos, echo=echo, stop_ids=stop_ids)
                    for i, sampler in enumerate(samplers)]
        for request in requests:
            self.engine.submit(request)
        return requests, events

    def token_text(self, token: int) -> str:
        """The text of one token (for logprobs)."""
        return self.tokenizer.decode([token])

    async def classify(self, texts: list[str], adapter: str) -> tuple[list[list[float]], list[str] | None, int]:
        """Each text's class probabilities with ``adapter`` ("base" for none), the class names, and
        the prompt tokens read; a regression adapter's: each text's number, and None for names."""
        self.registry.check_known(adapter)
        if len(texts) > 64:
            raise LimitError(f"input has {len(texts)} texts; send at most 64 per request", "input")
        self.check_room()
        self._count_calls(+1)
        started = False

        def run() -> list[dict]:
            nonlocal started
            started = True
            self._count_calls(-1)
            return self._classify_now(texts, adapter)

        try:
            return await asyncio.wrap_future(self.engine.call(run))
        finally:
            if not started:  # cancelled before it ran
                self._count_calls(-1)

    def _count_calls(self, change: int) -> None:
        with self._calls_lock:
            self._calls_waiting += change

    def _classify_now(self, texts: list[str], adapter: str) -> tuple[list[list[float]], list[str] | None, int]:
        from lorakit.per_row import per_row_adapters

        entry = None
        if adapter != BASE:
            entry = self.registry.acquire(adapter)
            if entry is None:
                raise QueueFull(f"all {self.registry.max_loaded} resident adapters are busy; retry in a second")
        try:
            # as lorakit predict reads a text: cut to the length the adapter trained with, and only
            # ids and mask (GPT-2 adds token_type_ids through its word embeddings)
            length = min(entry.max_length or self.limits.max_prompt_tokens, self.limits.context) if entry \
                else self.limits.max_prompt_tokens
            pairs = entry is not None and entry.pairs
            if not pairs and any(isinstance(text, list) for text in texts):
                raise LimitError(f"input holds a pair of texts, but {adapter!r} classifies single texts (it was not "
                                 "trained on pairs), so it takes no pair", "input")
            batch = self.tokenizer(*(_pairs(texts) if pairs else (texts,)), padding=True, truncation=True,
                                   max_length=length, return_tensors="pt")
            with torch.inference_mode(), per_row_adapters(self.model, [entry.slot if entry else None] * len(texts)):
                logits = self.model(**model_inputs(batch, pairs)).logits
        finally:
            if entry is not None:
                self.registry.release(entry)
        tokens = int(batch["attention_mask"].sum())
        if logits.shape[-1] == 1:  # one output: a regression's number (transformers' num_labels=1)
            return logits.float().tolist(), None, tokens
        return torch.softmax(logits.float(), dim=-1).tolist(), self._labels(adapter, logits.shape[-1]), tokens

    def _labels(self, adapter: str, count: int) -> list[str]:
        """Class names: the adapter's own (its ``lorakit_task.json``, as ``lorakit predict``
        uses them) when it has as many as the head has outputs, else the model's
        (:func:`lorakit.tasks.classify.model_labels`, as ``lorakit predict`` names them)."""
        own = self.registry.labels(adapter) if adapter != BASE else None
        return own if own is not None and len(own) == count else model_labels(self.model, count)

    async def add_adapter(self, name: str, path: str, replace: bool = False) -> dict:
        """Load an adapter over HTTP (its path must lie under the adapter root); ``replace``
        swaps an adapter of that name for the new files."""
        entry = await asyncio.wrap_future(
            self.engine.call(lambda: self.registry.register(name, path, replace=replace)))
        load_ms = None if entry.last_load_s is None else round(entry.last_load_s * 1000, 2)
        return {"id": entry.name, "object": "model", "parent": BASE, "resident": entry.slot is not None, "load_ms": load_ms}

    async def remove_adapter(self, name: str) -> dict:
        self.registry.check_known(name)
        if name == BASE:
            raise LimitError("the base model cannot be removed", "name")
        await asyncio.wrap_future(self.engine.call(lambda: self.registry.unregister(name)))
        return {"id": name, "object": "model", "deleted": True}


def _pairs(texts: list[str]) -> tuple[list[str], list[str]]:
    """The two texts of each input to an adapter trained on pairs (``"first<TAB>second"``); a 400 otherwise."""
    try:
        return split_pairs(texts)
    except LorakitError as err:
        raise LimitError(str(err), "input") from None


def detect_task(spec: str, adapters: dict[str, str] | None = None) -> str:
    """``classify`` for a ``--model`` value naming a sequence classifier ("default" is the embedded one; the kind is
    :func:`lorakit.models.spec_kind`'s), or for a language model given only classifier adapters (``SEQ_CLS``: trained
    on its body, as ``lorakit train --model FILE.gguf`` does), else ``generate``."""
    from lorakit.models import spec_kind
    from lorakit.targets import CLASSIFIER

    kinds = {json.loads(f.read_text()).get("task_type") if (f := Path(p) / "adapter_config.json").is_file() else None
             for p in (adapters or {}).values()}
    return CLASSIFY if spec_kind(spec) == CLASSIFIER or kinds == {"SEQ_CLS"} else GENERATE


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
                  load_on_demand: bool = False, max_queue: int = 256, request_timeout: float | None = None,
                  max_body_bytes: int = 1_000_000, quantize: str | None = None,
                  chat_template: str | None = None) -> Service:
    """Load ``model``, register ``adapters`` ({name: folder}) and build the engine (not started). ``task``: as
    :func:`detect_task` finds it where None. ``quantize`` (``"nf4"``, ``"int8"``) stores the base's linear weights
    quantized (:mod:`lorakit.quantize`). ``load_on_demand``: a request naming a folder directly under
    ``adapter_root`` that is not registered loads it first. ``chat_template``: the chats' template instead of the
    tokenizer's own (:func:`lorakit.chat_templates.resolve`: ``chatml``, a template file, or an adapter folder
    that carries one). The other arguments are :class:`Limits`.

    Raises:
        LorakitError: a bad model spec, adapter name, path or file, or a bad limit.
    """
    from lorakit.models import load_causal_lm, load_classifier

    # the limits and the root are checked before the model loads, so a bad flag fails at once
    limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_queue=max_queue,
                    request_timeout=request_timeout, max_body_bytes=max_body_bytes)
    registry = AdapterRegistry(None, adapter_root=adapter_root, max_loaded=max_loaded, load_on_demand=load_on_demand)
    chat_templates.check(chat_template)  # a file: read before the model loads, so a bad path fails at once
    task = task or detect_task(model, adapters)
    if chat_template is not None and task == CLASSIFY:
        raise LorakitError(f"--chat-template is for a model that generates; {model!r} is served to classify")
    if task == CLASSIFY:
        base, tokenizer = load_classifier(model, id2label=_folder_labels(model))
    else:
        base, tokenizer = load_causal_lm(model)
    if quantize:
        from lorakit.quantize import quantize_base

        quantize_base(base, quantize)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    chat_templates.apply(tokenizer, chat_template)
    from lorakit.targets import position_limit

    limits.context = int(position_limit(base) or getattr(base.config, "max_position_embeddings", None) or 2048)
    limits.max_prompt_tokens = min(max_prompt_tokens, limits.context)
    registry.model = base
    for name, path in (adapters or {}).items():
        registry.register(name, path, trusted=True, load=True)
    engine = Engine(base, tokenizer, registry, max_batch=max_batch)
    return Service(base, tokenizer, task, model, registry, engine, limits)
