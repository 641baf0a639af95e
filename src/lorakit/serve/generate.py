"""``POST /v1/completions`` and ``POST /v1/chat/completions``: from a checked request body to
OpenAI's answer, whole or streamed as server-sent events.

One request with ``n`` choices becomes ``n`` engine requests decoding side by side (choice
i > 0 samples with a seed derived from ``seed`` and i, so a seeded request repeats and its
choices differ); a completion request with several prompts, ``n`` for each, choice
``i * n + j`` being prompt ``i``'s ``j``-th (each prompt's choices seeded as if it came alone). While a request is being answered:

- a client that goes away (streaming or not) cancels its engine requests, which leave the
  batch at the next decode step (a waiting one leaves the queue);
- past ``--request-timeout`` the engine requests are cancelled and the answer is 504 (a
  stream that already started ends with an error chunk instead);
- the first event is awaited before a stream starts, so a failure known early (an adapter
  that does not load) still gets its proper status.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorakit.serve import schemas
from lorakit.serve.engine import Event
from lorakit.serve.formats import ChatFormat, CompletionFormat
from lorakit.serve.responses import RequestTimeout, error_response
from lorakit.serve.sampling import Sampler
from lorakit.serve.service import GENERATE, LimitError, Service


async def complete(service: Service, metrics, http: Request, body: schemas._Sampling, chat: bool):
    """The whole route: check, tokenize off the event loop, generate, answer."""
    http.state.adapter = body.model
    service.require_task(GENERATE)
    prompts = None if chat else body.prompts()
    service.check_room(body.n * (1 if chat else len(prompts)))  # before the tokenizer's work: a full queue answers at once
    await service.ensure_model(body.model)
    echoes = None
    if chat:
        ids = [await asyncio.to_thread(service.encode_chat, [m.as_dict() for m in body.messages],
                                       body.add_generation_prompt, body.continue_final_message, True, body.model)]
        echoed = body.echoed()
        echoes = None if echoed is None else [echoed]
    else:
        ids = await asyncio.to_thread(lambda: [service.encode_prompt(prompt) for prompt in prompts])
        if body.echo:  # each prompt as given; token ids as their text
            echoes = [p if isinstance(p, str) else service.tokenizer.decode(i) for p, i in zip(prompts, ids)]
    return await _generate(service, metrics, http, body, ids, chat, echoes)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index``: ``seed`` itself for the first, a hash of both for the others."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") - 2**63


async def _generate(service: Service, metrics, http: Request, body: schemas._Sampling, prompts: list[list[int]],
                    chat: bool, echoes: list[str] | None = None):
    """Generate ``n`` choices for each prompt (token ids); choice ``i * n + j`` is prompt ``i``'s ``j``-th.
    ``echoes``: each prompt's text, for ``echo`` (every choice then starts with its prompt)."""
    longest = max(prompts, key=len)
    if body.max_tokens is None:  # OpenAI's defaults: 16 for completions, "as long as fits" for chat
        room = service.limits.context - len(longest)
        max_tokens = max(1, min(service.limits.max_tokens if chat else 16, room))
    else:
        max_tokens = body.max_tokens
    max_tokens = service.check_max_tokens(longest, max_tokens)
    if body.min_tokens > max_tokens:
        raise LimitError(f"min_tokens {body.min_tokens} is more than the {max_tokens} tokens this request may "
                         "generate; ask for fewer, or set max_tokens", "min_tokens")
    for param, ids in body.token_ids().items():
        service.check_token_ids(ids, param)
    # an answer also ends at the end of turn of the template its adapter was trained with, a chat's and a
    # completion's alike (a client may render the chat itself)
    stop_ids = frozenset(body.stop_token_ids or ()) | (frozenset() if body.ignore_eos
                                                       else service.turn_end_ids(body.model))
    ends = stop_ids | (frozenset() if body.ignore_eos else frozenset(service.engine.eos_ids))
    samplers = [Sampler(temperature=body.temperature, top_p=body.top_p, seed=choice_seed(body.seed, j),
                        top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                        logit_bias=body.logit_bias, min_tokens=body.min_tokens, end_ids=ends, prompt_ids=ids)
                for ids in prompts for j in range(body.n)]
    k = body.logprobs_k()
    requests, events = service.submit([ids for ids in prompts for _ in range(body.n)], body.model, max_tokens,
                                      samplers, body.stop, logprobs=k, ignore_eos=body.ignore_eos,
                                      echo=echoes is not None and not chat, stop_ids=stop_ids)
    timeout = service.limits.request_timeout
    run = _Run(service, metrics, body, requests, events,
               None if timeout is None else asyncio.get_running_loop().time() + timeout,
               None if echoes is None else [text for text in echoes for _ in range(body.n)], leads=chat)
    fmt = ChatFormat(body.model, service.token_text, logprobs=k is not None, include_usage=body.include_usage,
                     role=body.answer_role()) if chat else \
        CompletionFormat(body.model, service.token_text, logprobs=k is not None, include_usage=body.include_usage)
    prompt_tokens = sum(len(ids) for ids in prompts)
    watcher = asyncio.create_task(_on_disconnect(http, run.cancel))
    streaming = False
    try:
        first = await run.next()
        if first[1].kind == "error":
            run.cancel()
            return error_response(first[1].error)
        if body.stream:
            streaming = True
            return StreamingResponse(_sse(run, first, fmt, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return _whole(await run.collect(first), fmt, prompt_tokens)
    except RequestTimeout as err:
        run.cancel()
        return error_response(err)
    finally:
        watcher.cancel()  # a stream watches its client itself (Starlette cancels it on disconnect)
        if not streaming:
            run.cancel()  # a no-op when every choice finished


async def _on_disconnect(http: Request, cancel) -> None:
    """Wait for the client to go away (``http.disconnect``), then cancel its engine requests."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            cancel()
            return


class _Run:
    """The engine requests of one HTTP request and their events, in arrival order."""

    def __init__(self, service: Service, metrics, body, requests, events: asyncio.Queue, deadline: float | None,
                 echoes: list[str] | None = None, leads: bool = False):
        self.service, self.metrics, self.body = service, metrics, body
        self.requests, self.events, self.deadline = requests, events, deadline
        self.started = time.perf_counter()
        # choice i's echoed text: sent when the engine's "prompt" event comes (a completion's prompt,
        # with its logprobs), or (``leads``: a chat's last message) before anything else
        self.echoes = echoes
        self.leads = echoes if leads else None
        self.first_at: dict[int, float] = {}
        self.last_at: dict[int, float] = {}

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()
        self.events.put_nowait((-1, Event("cancelled")))  # wake a waiting next()

    async def next(self) -> tuple[int, Event]:
        """The next event of any choice; raises :class:`RequestTimeout` past the deadline."""
        if self.deadline is None:
            index, event = await self.events.get()
        else:
            remaining = self.deadline - asyncio.get_running_loop().time()
            try:
                index, event = await asyncio.wait_for(self.events.get(), max(0.0, remaining))
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the request took longer than this server's --request-timeout of "
                                     f"{self.service.limits.request_timeout:g} s; ask for fewer tokens or retry "
                                     "when the server is less busy") from None
        now = time.perf_counter() - self.started
        if event.kind == "text":
            self.first_at.setdefault(index, now)
            self.last_at[index] = now
        elif event.kind == "done" and self.metrics is not None:
            self.metrics.record_generation(self.body.model, event.completion_tokens, self.first_at.get(index),
                                           self.last_at.get(index))
        return index, event

    async def collect(self, first: tuple[int, Event]) -> list[tuple[str, list, Event]]:
        """Every choice's text, logprobs and "done" event (an error event ends early)."""
        texts: dict[int, list[str]] = {i: [self.leads[i]] if self.leads else [] for i in range(len(self.requests))}
        logprobs: dict[int, list] = {i: [] for i in range(len(self.requests))}
        done: dict[int, Event] = {}
        index, event = first
        while True:
            if event.kind in ("error", "cancelled"):
                return [("", [], event)]
            if 0 <= index < len(self.requests):
                logprobs[index].extend(event.logprobs)
                if event.kind == "text":
                    texts[index].append(event.text)
                elif event.kind == "prompt":  # echo: comes before the choice's text
                    texts[index].append(self.echoes[index])
                else:
                    done[index] = event
            if len(done) == len(self.requests):
                return [("".join(texts[i]), logprobs[i], done[i]) for i in range(len(self.requests))]
            index, event = await self.next()


def _whole(results, fmt, prompt_tokens: int):
    if len(results) == 1 and results[0][2].kind != "done":
        event = results[0][2]
        if event.kind == "cancelled":  # the client left; nobody reads this answer
            return JSONResponse(schemas.error_body("cancelled", "cancelled"), status_code=499)
        return error_response(event.error)
    choices = [fmt.choice(i, text, entries, done.finish_reason) for i, (text, entries, done) in enumerate(results)]
    completion_tokens = sum(done.completion_tokens for _, _, done in results)
    return fmt.whole(choices, prompt_tokens, completion_tokens)


async def _sse(run: _Run, first: tuple[int, Event], fmt, prompt_tokens: int):
    """Server-sent events: role heads (chat), a chunk per piece of text, a last chunk per
    choice with its finish reason, the usage chunk when asked for, then ``[DONE]``."""
    try:
        for head in fmt.heads(len(run.requests)):
            yield _data(head)
        for index, lead in enumerate(run.leads or []):
            yield _data(fmt.chunk(index, lead, []))
        finished, completion_tokens = 0, 0
        index, event = first
        while True:
            if event.kind == "text":
                yield _data(fmt.chunk(index, event.text, event.logprobs))
            elif event.kind == "prompt":
                yield _data(fmt.chunk(index, run.echoes[index], event.logprobs))
            elif event.kind == "done":
                yield _data(fmt.chunk(index, None, event.logprobs, event.finish_reason))
                finished += 1
                completion_tokens += event.completion_tokens
                if finished == len(run.requests):
                    break
            elif event.kind == "error":
                yield _data(json.loads(error_response(event.error).body))
                break
            else:  # cancelled
                return
            try:
                index, event = await run.next()
            except RequestTimeout as err:
                yield _data(json.loads(error_response(err).body))
                break
        if fmt.include_usage and finished == len(run.requests):
            yield _data(fmt.usage_chunk(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        for request in run.requests:
            request.cancel()  # a no-op when finished; frees the rows when the client went away


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
