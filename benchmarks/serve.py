"""Serving many adapters on one base model: throughput against PEFT, cold loads, bursts.

1. **Throughput** (one run each, same requests): ``requests`` greedy completions of
   exactly ``new_tokens`` tokens (end-of-sequence ignored), two per adapter over
   ``adapters`` adapters, all arriving at once:

   - lorakit's engine (continuous batching, per-row adapters, one forward of the base
     per step, at most ``max_batch`` rows);
   - PEFT's best for mixed traffic: transformers' ``generate`` on a ``PeftModel`` with
     ``adapter_names`` (one adapter per row), in batches of ``max_batch`` rows, left padded;
   - lorakit's engine with the same requests all for one adapter (the cost of mixing).

   Goals (issue 14): lorakit ≥ 3× PEFT's tokens/s, and ≥ 0.9× its own one-adapter figure.
2. **Load on demand**: time to the first token of a request for an adapter that is on disk
   but not loaded (rank 8 on every linear layer of the blocks), minus the same for an
   adapter already resident: the latency a cold adapter adds.
3. **Burst**: a real ``lorakit serve`` in a subprocess with ``--max-queue N`` gets 4N
   requests at once. Goals: none lost (each answered 200 or 429, no 5xx), every accepted
   one completed, the 429s answered within 50 ms (p99, seen by the client), the server's
   RSS after the burst within 10% of before.

Full run: the embedded SmolLM2-135M-Instruct (fp32, CPU). ``quick=True``: the toy model of
:mod:`lorakit.serve.toy` at tiny sizes, to check the code runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lorakit.serve.engine import GenerationRequest
from lorakit.serve.service import Service, build_service
from lorakit.serve.toy import write_random_adapter, write_toy_model

PROMPTS = [
    "Write a SQL query that counts the orders of each customer.",
    "Summarise in one sentence: low-rank adaptation trains two small matrices.",
    "What is the capital of France?",
    "Give three tips for writing clear code.",
]


def _drive(service: Service, jobs: list[tuple[str, list[int]]], new_tokens: int) -> int:
    """Submit ``jobs`` (adapter, prompt ids) at once; wait for all; return tokens generated."""
    done = threading.Semaphore(0)
    counts: list[int] = []
    errors: list[Exception] = []

    def on_event(event):
        if event.kind == "done":
            counts.append(event.completion_tokens)
            done.release()
        elif event.kind == "error":
            errors.append(event.error)
            done.release()

    for adapter, ids in jobs:
        service.engine.submit(GenerationRequest(prompt_ids=ids, adapter=adapter, max_tokens=new_tokens,
                                                on_event=on_event, ignore_eos=True))
    for _ in jobs:
        done.acquire()
    if errors:
        raise errors[0]
    return sum(counts)


def _lorakit_tps(service: Service, jobs, new_tokens: int) -> float:
    start = time.perf_counter()
    tokens = _drive(service, jobs, new_tokens)
    return tokens / (time.perf_counter() - start)


def _peft_tps(model_dir: str | None, folders: dict[str, Path], jobs, tokenizer, new_tokens: int, batch: int) -> float:
    """transformers' generate on a PeftModel, ``adapter_names`` per row, batches of ``batch``."""
    from peft import PeftModel

    names = list(folders)
    model = PeftModel.from_pretrained(_plain_model(model_dir), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return _generate_tps(model.eval(), jobs, tokenizer, new_tokens, batch, per_row=True)


def _generate_tps(model, jobs, tokenizer, new_tokens: int, batch: int, per_row: bool) -> float:
    """Tokens/s of transformers' ``generate`` over ``jobs`` in left-padded batches of ``batch``;
    ``per_row``: each row with its job's adapter (PEFT's ``adapter_names``), else the model as it is."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(ids) for _, ids in jobs]
    start, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for at in range(0, len(jobs), batch):
            inputs = tokenizer(texts[at:at + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            rows = {"adapter_names": [a for a, _ in jobs[at:at + batch]]} if per_row else {}
            out = model.generate(**inputs, **rows, do_sample=False, min_new_tokens=new_tokens,
                                 max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
            tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return tokens / (time.perf_counter() - start)


def _plain_model(model_dir: str | None):
    if model_dir is not None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir).eval()
    from lorakit.models import load_causal_lm

    return load_causal_lm("default-chat", tokenizer=False)[0].eval()


def _first_token_s(service: Service, adapter: str, ids: list[int]) -> float:
    """Seconds from asking for ``adapter`` (loading it if on disk only) to its first token."""
    first = threading.Event()
    start = time.perf_counter()
    service.engine.call(lambda: service.registry.ensure(adapter)).result()
    service.engine.submit(GenerationRequest(prompt_ids=ids, adapter=adapter, max_tokens=2, ignore_eos=True,
                                            on_event=lambda event: first.set()))
    first.wait()
    elapsed = time.perf_counter() - start
    while service.engine.running() or service.engine.queued():
        time.sleep(0.001)
    return elapsed


def _cold_start(service: Service, cold: list[str], warm: str, ids: list[int]) -> dict:
    warm_s = [_first_token_s(service, warm, ids) for _ in cold]
    cold_s = [_first_token_s(service, name, ids) for name in cold]
    loads = [service.registry._entries[name].last_load_s for name in cold]
    return {"warm_first_token_ms": round(statistics.median(warm_s) * 1000, 1),
            "cold_first_token_ms": round(statistics.median(cold_s) * 1000, 1),
            "added_ms": round((statistics.median(cold_s) - statistics.median(warm_s)) * 1000, 1),
            "load_adapter_ms": round(statistics.median(loads) * 1000, 1), "cold_adapters": len(cold)}


def run(quick: bool = False, threads: int | None = None) -> dict:
    """The three measurements; returns the figures as a dict.

    ``threads``: torch's CPU threads (default: 1 with ``quick``, else torch's own setting).
    """
    sizes = (dict(adapters=4, requests=8, new_tokens=4, max_batch=4, cold=2, queue=4) if quick else
             dict(adapters=32, requests=64, new_tokens=64, max_batch=32, cold=5, queue=256))
    before = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if quick else before))
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
            result = _run(quick, Path(tmp), **sizes)
    finally:
        torch.set_num_threads(before)
    return {"model": "toy" if quick else "SmolLM2-135M-Instruct (fp32)", "threads": torch.get_num_threads(),
            "adapters_desc": "rank 8 on q,k,v,o,gate,up,down of every block", **sizes, **result}


def _run(quick: bool, tmp: Path, adapters: int, requests: int, new_tokens: int, max_batch: int, cold: int,
         queue: int) -> dict:
    model_dir = str(write_toy_model(tmp / "toy")) if quick else None
    root = tmp / "adapters"
    root.mkdir()
    service = build_service(model_dir or "default-chat", adapter_root=str(root), max_loaded=adapters + cold + 1,
                            max_batch=max_batch, load_on_demand=True)  # the cold adapters load as they are asked for
    names = [f"a{i}" for i in range(adapters)]
    for i, name in enumerate([*names, *(f"cold{i}" for i in range(cold))]):
        write_random_adapter(service.model, root / name, seed=i, r=8, scale=0.1)
    for name in names:
        service.registry.register(name, name)
    prompts = [service.tokenizer.encode(p) for p in PROMPTS]
    mixed = [(names[i % adapters], prompts[i % len(prompts)]) for i in range(requests)]
    single = [(names[0], ids) for _, ids in mixed]
    service.start()
    try:
        _drive(service, mixed[:adapters], 2)  # warm-up: every adapter in the stacks once
        lorakit_mixed = _lorakit_tps(service, mixed, new_tokens)
        lorakit_one = _lorakit_tps(service, single, new_tokens)
        print(f"serve: lorakit {lorakit_mixed:.1f} tokens/s with {adapters} adapters, {lorakit_one:.1f} with 1",
              file=sys.stderr, flush=True)
        cold_start = _cold_start(service, [f"cold{i}" for i in range(cold)], names[0], prompts[2])
    finally:
        service.stop()
    peft = _peft_tps(model_dir, {n: root / n for n in names}, mixed, service.tokenizer, new_tokens, max_batch)
    base = _generate_tps(_plain_model(model_dir), mixed, service.tokenizer, new_tokens, max_batch, per_row=False)
    print(f"serve: PEFT generate {peft:.1f} tokens/s; the base model's generate {base:.1f}", file=sys.stderr, flush=True)
    del service
    burst = _burst(model_dir or "default-chat", queue, 8 if quick else 16, tmp / "burst.log")
    return {
        "tokens_per_s": {"lorakit_mixed": round(lorakit_mixed, 1), "lorakit_one_adapter": round(lorakit_one, 1),
                         "peft_generate_mixed": round(peft, 1), "base_generate": round(base, 1)},
        "ratio_vs_peft": round(lorakit_mixed / peft, 2),
        "ratio_vs_one_adapter": round(lorakit_mixed / lorakit_one, 3),
        "load_on_demand": cold_start,
        "burst": burst,
    }


# ---------------------------------------------------------------------------------- burst


def _burst(model: str, queue: int, new_tokens: int, log: Path) -> dict:
    """4 × ``queue`` requests at once against a real server with ``--max-queue queue``."""
    import httpx
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 16 * queue + 256)), hard))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", model, "--port", str(port),
                             "--max-queue", str(queue), "--max-tokens", str(new_tokens), "--log-level", "warning"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(url, proc, log)
        body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        httpx.post(url + "/v1/completions", json=body, timeout=120).raise_for_status()  # warm-up
        server = psutil.Process(proc.pid)
        rss_before = server.memory_info().rss
        answers = asyncio.run(_send_all(url, body, 4 * queue))
        while httpx.get(url + "/health").json()["running"]:
            time.sleep(0.05)
        rss_after = server.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(60)
    statuses = [status for status, _, _ in answers]
    refused_ms = sorted(ms for status, ms, _ in answers if status == 429)
    completed = sum(1 for status, _, tokens in answers if status == 200 and tokens == new_tokens)
    return {"sent": len(answers), "accepted": statuses.count(200), "refused_429": statuses.count(429),
            "lost": len(answers) - statuses.count(200) - statuses.count(429),
            "accepted_completed": completed,
            "p99_429_ms": round(refused_ms[min(len(refused_ms) - 1, int(0.99 * len(refused_ms)))], 1)
            if refused_ms else None,
            "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
            "rss_change": round(rss_after / rss_before - 1, 3)}


async def _send_all(url: str, body: dict, count: int) -> list[tuple[int, float, int]]:
    """``(status or -1, ms, completion tokens)`` of ``count`` requests sent at once.

    A bare HTTP/1.1 client on asyncio streams: every connection is opened first, then all
    requests are written in one go, and each one's time runs from its request being written
    to its whole answer read. (A client library's own per-request work, on the same two cores
    as the server, would otherwise be counted as the server's latency.)"""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode() + payload
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(count)]
    go = asyncio.Event()

    async def one(reader, writer):
        await go.wait()
        start = time.perf_counter()
        try:
            writer.write(request)
            await writer.drain()
            answer = await reader.read()  # the server closes the connection after its answer
        except OSError:
            return -1, (time.perf_counter() - start) * 1000, 0
        finally:
            writer.close()
        ms = (time.perf_counter() - start) * 1000
        head, _, content = answer.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return -1, ms, 0
        status = int(parts[1])
        tokens = json.loads(content).get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
        return status, ms, tokens

    tasks = [asyncio.create_task(one(reader, writer)) for reader, writer in connections]
    await asyncio.sleep(0)
    go.set()
    return await asyncio.gather(*tasks)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


# ---------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    """The ``## Serving`` section of BENCHMARKS.md."""
    tps, cold, burst = result["tokens_per_s"], result["load_on_demand"], result["burst"]
    return f"""## Serving

`python -m benchmarks serve` ({result['model']}, {result['adapters_desc']}; torch threads: {result['threads']}).
{result['requests']} greedy requests of exactly {result['new_tokens']} new tokens, two per adapter over
{result['adapters']} adapters, all arriving at once; batches of at most {result['max_batch']} rows; one run each.

| | tokens/s | lorakit with {result['adapters']} adapters against it |
|---|---|---|
| lorakit, {result['adapters']} adapters (engine, per-row adapters) | {tps['lorakit_mixed']} | |
| PEFT: `generate` with `adapter_names`, mixed batches | {tps['peft_generate_mixed']} | {result['ratio_vs_peft']}× (goal ≥ 3×) |
| lorakit, the same requests on 1 adapter | {tps['lorakit_one_adapter']} | {result['ratio_vs_one_adapter']}× (goal ≥ 0.9×) |
| transformers: `generate` on the base model, no adapters (a ceiling for any adapter method on `generate`) | {tps.get('base_generate', '–')} | {round(tps['lorakit_mixed'] / tps['base_generate'], 2) if tps.get('base_generate') else '–'}× |

Load on demand (`--load-on-demand`, {cold['cold_adapters']} cold adapters, median): a cold adapter's first
token after {cold['cold_first_token_ms']} ms against {cold['warm_first_token_ms']} ms for a resident one:
**{cold['added_ms']} ms added** (of which reading and attaching the adapter: {cold['load_adapter_ms']} ms).

Burst of {burst['sent']} requests at once against `--max-queue {result['queue']}`: {burst['accepted']} accepted
(all completed: {burst['accepted_completed'] == burst['accepted']}), {burst['refused_429']} answered 429,
{burst['lost']} lost; 429 answered within {burst['p99_429_ms']} ms (p99, from the request written to the answer
read, client-side; goal 50 ms); server RSS
{burst['rss_before_mb']} MB before, {burst['rss_after_mb']} MB after ({burst['rss_change']:+.1%}; goal within 10%).
"""
