"""The generation engine: one thread owns the model and decodes every running request
together, whatever adapter each one uses.

Each step of the loop
1. takes new requests and commands (adapter loads and unloads run here, between steps,
   so they never race a forward pass);
2. admits waiting requests while there is room (``max_batch`` rows) and their adapter
   can be made resident, and *prefills* them: prompts of equal length go through the
   model together, each with its own adapter, and every new row joins the batch cache;
3. runs *one* forward of the base model for one new token of every row, with
   ``per_row_adapters`` applying row i's adapter to row i (seeds 002/004: "customers can
   select their desired task during inference");
4. samples, streams text out, and retires rows that finished, freeing their adapters.

A request that arrives during a step joins at the next one (continuous batching); a
finished one leaves at once. Greedy answers equal the adapter's answer run alone: each
row sees only its own tokens (left padding is masked, positions are per row). A row whose
logits are not finite fails alone (its request gets an error, the others go on), and a
request cancelled while it waits leaves the queue at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorakit.alora import invokes
from lorakit.chat_templates import end_ids
from lorakit.errors import LorakitError
from lorakit.heap import release_freed_memory
from lorakit.serve.detokenize import TextStream
from lorakit.serve.held import HeldRows
from lorakit.serve.kv import BatchCache
from lorakit.serve.registry import BASE, AdapterEntry, AdapterRegistry
from lorakit.serve.sampling import (NonFiniteLogits, Sampler, TokenLogprob, pick_tokens, prompt_logprobs,
                                    token_logprob)

log = logging.getLogger("lorakit.serve")


@dataclass
class Event:
    """What the engine reports about a request: ``kind`` is "prompt", "text", "done" or "error".

    ``logprobs`` (only when the request asked for them) are those of the tokens whose
    text this event completes; a "done" event carries the tokens not reported yet. A
    "prompt" event (only for ``echo``) comes first and carries the prompt's own tokens.
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)
class GenerationRequest:
    """One completion to generate.

    Attributes:
        prompt_ids: the tokenized prompt.
        adapter: an adapter name, or "base".
        max_tokens: most tokens to generate.
        on_event: called on the engine thread with each :class:`Event`; must not block.
        logprobs: None for no log-probabilities; k >= 0 to report each token's and the
            top k alternatives'.
        ignore_eos: go on past an end-of-sequence token, to ``max_tokens`` or a stop string.
        stop_ids: tokens that end the answer besides the end-of-sequence ones (not in its text).
        echo: report the prompt first (a "prompt" event, with its tokens' logprobs when
            ``logprobs`` is set); ``max_tokens`` may then be 0, for the prompt alone.
    """

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    on_event: Callable[[Event], None]
    sampler: Sampler = field(default_factory=lambda: Sampler(temperature=0.0))
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False
    stop_ids: frozenset[int] = frozenset()
    echo: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (the client went away)."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    entry: AdapterEntry | None
    stream: TextStream
    next_token: int = -1
    generated: int = 0
    finish_reason: str | None = None
    error: Exception | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet reported
    invoked: bool | None = None  # an activated adapter's (aLoRA): whether the prompt held its invocation

    @property
    def slot(self) -> str | None:
        return self.entry.slot if self.entry is not None else None


class Engine:
    """Continuous batching of decode steps across adapters on one model.

    Args:
        model: a causal LM (transformers), already on its device, in eval mode.
        tokenizer: its tokenizer (``decode`` is used to stream text).
        registry: the adapters this engine may use.
        max_batch: most requests decoding at once.
    """

    def __init__(self, model, tokenizer, registry: AdapterRegistry, max_batch: int = 32):
        if max_batch < 1:
            raise LorakitError(f"--max-batch must be at least 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.registry = registry
        self.max_batch = max_batch
        self.eos_ids = end_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[GenerationRequest] = deque()
        self._queued = 0  # submitted and not yet admitted, dropped or failed
        self._queued_lock = threading.Lock()
        self._rows: list[_Row] = []
        self._batch = BatchCache(getattr(model, "config", None))
        self._held = HeldRows(model)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.tokens_generated = 0
        self.steps = 0
        self._steps_at_idle = 0

    # ---- the outside world (any thread) ---------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish every request already accepted, then end the engine thread."""
        self._stopping.set()
        self._inbox.put(None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        if self._stopping.is_set():
            raise LorakitError("the server is shutting down and accepts no new requests")
        self._count_queued(+1)
        self._inbox.put(request)

    def queued(self) -> int:
        """Requests submitted and waiting for a row (not yet decoding)."""
        return self._queued

    def running(self) -> int:
        """Requests decoding now (the batch size of the next step)."""
        return len(self._rows)

    def _count_queued(self, change: int) -> None:
        with self._queued_lock:
            self._queued += change

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the engine thread between two steps; its result or error goes to the Future."""
        future: Future = Future()
        self._inbox.put((fn, future))
        return future

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": self._queued,
                "tokens_generated": self.tokens_generated, "steps": self.steps}

    # ---- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            idle = not self._rows and not self._waiting
            if idle and self._stopping.is_set() and self._inbox.empty():
                self._held.close()
                return
            if idle or not self._inbox.empty():
                self._held.close()  # commands may load or unload adapters
            if idle and self.steps != self._steps_at_idle:  # a batch has just drained
                self._steps_at_idle = self.steps
                release_freed_memory()
            self._take_inbox(block=idle)
            try:
                self._admit()
                if self._rows:
                    self._decode_step()
            except Exception as err:  # noqa: BLE001 - fail this batch, keep serving
                log.exception("engine step failed")
                self._held.close()
                for row in self._rows:
                    row.finish_reason = "error"
                    self._retire(row, error=err)
                self._rows = []
                self._batch = BatchCache(getattr(self.model, "config", None))

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, GenerationRequest):
                self._waiting.append(item)
            elif isinstance(item, tuple):
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # noqa: BLE001 - handed to the caller
                        future.set_exception(err)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Move waiting requests into the batch while rows and adapter slots allow."""
        if any(request.cancelled for request in self._waiting):  # their clients went away
            kept = deque(request for request in self._waiting if not request.cancelled)
            self._count_queued(len(kept) - len(self._waiting))
            self._waiting = kept
        if not self._waiting or len(self._rows) >= self.max_batch:
            return
        self._held.close()  # admitting may load and evict adapters, and prefill uses its own rows
        admitted: list[_Row] = []
        still_waiting: deque[GenerationRequest] = deque()
        for request in self._waiting:
            if len(self._rows) + len(admitted) >= self.max_batch:
                still_waiting.append(request)
                continue
            entry = None
            if request.adapter != BASE:
                try:
                    entry = self.registry.acquire(request.adapter)
                except LorakitError as err:
                    request.on_event(Event("error", error=err))
                    continue
                if entry is None:  # every resident adapter is busy: wait for one to free up
                    still_waiting.append(request)
                    continue
            stream = TextStream(self.tokenizer, request.stop)
            row = _Row(request=request, entry=entry, stream=stream)
            row.invoked = invokes(self.model, row.slot, request.prompt_ids)
            admitted.append(row)
        self._count_queued(len(still_waiting) - len(self._waiting))
        self._waiting = still_waiting
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as err:
                log.exception("prefill failed")
                for row in admitted:
                    if row not in self._rows:  # the running rows are untouched and go on
                        self._retire(row, error=err)

    def _prefill(self, rows: list[_Row]) -> None:
        """Run new prompts (equal lengths together), sample their first token, add them to the batch.
        A prompt whose every token is scored (echo with logprobs) runs alone: its logits are
        ``(length, vocab)``, so one request's memory does not grow with the others'."""
        groups: dict[tuple, list[_Row]] = defaultdict(list)  # (length, the row itself when it runs alone)
        for row in rows:
            alone = row.request.echo and row.request.logprobs is not None
            groups[len(row.request.prompt_ids), id(row) if alone else None].append(row)
        caches, lengths, joined = [], [], []
        for (length, alone), group in groups.items():
            ids = torch.tensor([row.request.prompt_ids for row in group], device=self.device)
            with torch.inference_mode(), self._adapters([row.slot for row in group]):
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1 if alone is None else 0)
            logits = out.logits[:, -1, :]
            tokens = pick_tokens(logits, [row.request.sampler for row in group])
            caches.append(out.past_key_values)
            lengths.extend([length] * len(group))
            for i, (row, token) in enumerate(zip(group, tokens)):
                request = row.request
                if request.echo and not isinstance(token, Exception):
                    try:
                        entries = [] if request.logprobs is None else prompt_logprobs(
                            out.logits[i], request.prompt_ids, request.logprobs)
                        request.on_event(Event("prompt", logprobs=entries))
                    except NonFiniteLogits as err:  # the row fails alone, as in sampling
                        token = err
                if request.max_tokens == 0 and not isinstance(token, Exception):
                    row.finish_reason = "length"  # echo alone: the prompt, nothing generated
                else:
                    self._accept(row, token, logits[i])
            joined.extend(group)
        self._batch.add_rows(caches, lengths)
        self._rows.extend(joined)
        self._drop_finished()

    def _decode_step(self) -> None:
        """One token for every running row in one forward of the model."""
        mask, positions = self._batch.step_inputs()
        ids = torch.tensor([[row.next_token] for row in self._rows], device=self.device)
        self._held.use([row.slot for row in self._rows], [row.invoked for row in self._rows])
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask.to(self.device), position_ids=positions.to(self.device),
                             past_key_values=self._batch.cache, use_cache=True)
        self._batch.advance()
        self.steps += 1
        logits = out.logits[:, -1, :]
        tokens = pick_tokens(logits, [row.request.sampler for row in self._rows])
        for i, (row, token) in enumerate(zip(self._rows, tokens)):
            self._accept(row, token, logits[i])
        self._drop_finished()

    def _adapters(self, slots: list[str | None]):
        """Row i runs adapter ``slots[i]`` (None: the base). Adapters are loaded outside
        inference mode (between steps), so their tensors stay ordinary ones."""
        from lorakit.per_row import per_row_adapters

        return per_row_adapters(self.model, slots)

    def _accept(self, row: _Row, token: int | Exception, logits) -> None:
        """Record one sampled token for ``row`` and stream out any text it completes.

        ``token`` is an exception when this row could not be sampled (non-finite logits):
        the row finishes with that error. ``logits: (vocab,)`` are the row's, for logprobs.
        """
        request = row.request
        if isinstance(token, Exception):
            row.finish_reason, row.error, row.next_token = "error", token, 0
            return
        row.next_token = token
        row.generated += 1
        self.tokens_generated += 1
        request.sampler.accept(token)
        if request.cancelled:
            row.finish_reason = "cancelled"
            return
        if (token in self.eos_ids and not request.ignore_eos) or token in request.stop_ids:
            row.finish_reason = "stop"
            return
        if request.logprobs is not None:
            row.logprobs.append(token_logprob(logits, token, request.logprobs))
        piece = row.stream.add(token, row.generated >= request.sampler.min_tokens)
        if piece:
            request.on_event(Event("text", text=piece, logprobs=row.logprobs))
            row.logprobs = []
        if row.stream.stopped:
            row.finish_reason = "stop"
        elif row.generated >= request.max_tokens:
            row.finish_reason = "length"

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if row.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        self._held.close()  # releasing may unload a removed adapter
        for row in self._rows:
            if row.finish_reason is not None:
                self._retire(row, error=row.error)
        self._batch.keep_rows(keep)
        self._rows = [self._rows[i] for i in keep]

    def _retire(self, row: _Row, error: Exception | None = None) -> None:
        if row.entry is not None:
            self.registry.release(row.entry)
            row.entry = None
        request = row.request
        if error is not None:
            request.on_event(Event("error", error=error))
            return
        rest = row.stream.finish()
        if rest:
            request.on_event(Event("text", text=rest, logprobs=row.logprobs))
            row.logprobs = []
        request.on_event(Event("done", text=row.stream.text, finish_reason=row.finish_reason,
                               prompt_tokens=len(request.prompt_ids), completion_tokens=row.generated,
                               logprobs=row.logprobs))
