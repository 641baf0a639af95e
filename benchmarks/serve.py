"""Serving many adapters on one base model: throughput and adapter cold-load time.

Throughput: the same traffic (``requests`` greedy completions of ``max_tokens`` tokens,
all submitted at once) spread over 1, 8 and 32 distinct adapters, through the server's
engine (continuous batching, per-row adapters, one forward of the base per step). The
baseline "one adapter after another" is the same engine fed one adapter's requests at
a time, waiting for them to finish before the next adapter's: what a server that can
only batch requests of one adapter does. Scenarios are interleaved and repeated; the
median counts.

Cold load: ``lorakit.io.load_adapter`` of a rank-8 adapter from its folder into the
model (the file is in the OS page cache after the first read), then the first per-row
forward's rebuild of the stacked weights, reported separately.

Full run: the embedded SmolLM2-135M-Instruct with random rank-8 adapters on every
linear layer of its blocks. ``quick=True``: the toy model of :mod:`lorakit.serve.toy`.
``python -m benchmarks.serve`` also writes the ``## Serving`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lorakit.serve.engine import GenerationRequest
from lorakit.serve.registry import BASE
from lorakit.serve.service import Service, build_service
from lorakit.serve.toy import write_random_adapter, write_toy_model

PROMPTS = [
    "Write a SQL query that counts the orders of each customer.",
    "Summarise in one sentence: low-rank adaptation trains two small matrices.",
    "What is the capital of France?",
    "Give three tips for writing clear code.",
]
MAX_ADAPTERS = 32


def _drive(service: Service, jobs: list[tuple[str, list[int]]], max_tokens: int) -> int:
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
        service.engine.submit(GenerationRequest(prompt_ids=ids, adapter=adapter, max_tokens=max_tokens,
                                                on_event=on_event))
    for _ in jobs:
        done.acquire()
    if errors:
        raise errors[0]
    return sum(counts)


def _throughput(service: Service, jobs, max_tokens: int, one_adapter_at_a_time: bool) -> float:
    """Generated tokens per second for ``jobs``, all at once or one adapter's group at a time."""
    groups = [jobs]
    if one_adapter_at_a_time:
        by_adapter: dict[str, list] = {}
        for job in jobs:
            by_adapter.setdefault(job[0], []).append(job)
        groups = list(by_adapter.values())
    start = time.perf_counter()
    tokens = sum(_drive(service, group, max_tokens) for group in groups)
    return tokens / (time.perf_counter() - start)


def _cold_load_ms(service: Service, folder: Path, repeats: int) -> tuple[float, float]:
    """Median ms of load_adapter from disk, and of the first per-row forward's restacking."""
    from lorakit.io import load_adapter
    from lorakit.model import delete_adapter
    from lorakit.per_row import per_row_adapters

    loads, restacks = [], []
    for i in range(repeats):
        name = f"coldload{i}"
        start = time.perf_counter()
        load_adapter(service.model, folder, name, activate=False)
        loads.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        with per_row_adapters(service.model, [name]):
            pass  # entering builds the stacks the next forward uses
        restacks.append((time.perf_counter() - start) * 1000)
        delete_adapter(service.model, name)
    return statistics.median(loads), statistics.median(restacks)


def run(quick: bool = False, max_tokens: int | None = None, repeats: int | None = None,
        threads: int | None = None) -> dict:
    """Tokens/s with 1, 8 and 32 adapters in the traffic, the one-after-another baseline,
    and adapter cold-load time. Returns the figures as a dict.

    ``threads``: torch's CPU threads for the run (default: 1 with ``quick``, whose toy
    matmuls are too small to share, else torch's own setting).
    """
    requests = 32
    max_tokens = max_tokens or (4 if quick else 16)
    repeats = repeats or (1 if quick else 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if quick else before))
    try:
        return _run(quick, requests, max_tokens, repeats)
    finally:
        torch.set_num_threads(before)


def _run(quick: bool, requests: int, max_tokens: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
        tmp = Path(tmp)
        model_spec = str(write_toy_model(tmp / "toy")) if quick else "default-chat"
        service = build_service(model_spec, adapter_root=tmp, max_loaded=MAX_ADAPTERS, max_batch=requests)
        names = [f"a{i}" for i in range(MAX_ADAPTERS)]
        for i, name in enumerate(names):
            write_random_adapter(service.model, tmp / name, seed=i, r=8, scale=0.1)
        for name in names:
            service.registry.register(name, tmp / name)
        service.start()
        try:
            prompts = [service.tokenizer.encode(p) for p in PROMPTS]
            _drive(service, [(names[0], prompts[0])], 2)  # warm-up
            # distinct adapters in the traffic (0: the base model alone), one adapter at a time?
            scenarios = {"base": (0, False), "1": (1, False), "8": (8, False), "32": (32, False),
                         "8-one-after-another": (8, True), "32-one-after-another": (32, True)}
            measured: dict[str, list[float]] = {key: [] for key in scenarios}
            for _ in range(repeats):
                for key, (distinct, serial) in scenarios.items():
                    jobs = [(names[i % distinct] if distinct else BASE, prompts[i % len(prompts)])
                            for i in range(requests)]
                    measured[key].append(_throughput(service, jobs, max_tokens, serial))
                    print(f"serve: {key}: {measured[key][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
            load_ms, restack_ms = service.engine.call(
                lambda: _cold_load_ms(service, tmp / names[0], 3 if quick else 7)).result()
        finally:
            service.stop()
    tps = {key: round(statistics.median(values), 1) for key, values in measured.items()}
    return {
        "model": "toy" if quick else "SmolLM2-135M-Instruct (fp32)",
        "adapters": "rank 8 on q,k,v,o,gate,up,down of every block",
        "requests": requests, "max_tokens": max_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
        "tokens_per_s": tps,
        "ratio_vs_one_adapter": {k: round(tps[k] / tps["1"], 3) for k in ("8", "32")},
        "ratio_vs_one_after_another": {k: round(tps[k] / tps[f"{k}-one-after-another"], 2) for k in ("8", "32")},
        "cold_load_ms": round(load_ms, 2),
        "first_forward_restack_ms": round(restack_ms, 2),
    }


def markdown(result: dict) -> str:
    """The ``## Serving`` section of BENCHMARKS.md for a full run."""
    tps = result["tokens_per_s"]
    ratio1, ratio_seq = result["ratio_vs_one_adapter"], result["ratio_vs_one_after_another"]
    return f"""## Serving

`python -m benchmarks serve` ({result['model']}, {result['adapters']}; {result['requests']} greedy
requests of {result['max_tokens']} tokens submitted at once, engine with max batch {result['requests']},
torch threads: {result['threads']}, median of {result['repeats']} interleaved runs). The one-after-another
baseline is the same engine fed one adapter's requests at a time.

| adapters in the traffic | tokens/s | vs 1 adapter (goal ≥ 0.9×) | vs one adapter after another (goal ≥ 2×) |
|---|---|---|---|
| none (base model alone) | {tps['base']} | | |
| 1 | {tps['1']} | 1.00× | |
| 8 | {tps['8']} | {ratio1['8']:.2f}× | {ratio_seq['8']:.2f}× ({tps['8-one-after-another']} tokens/s) |
| 32 | {tps['32']} | {ratio1['32']:.2f}× | {ratio_seq['32']:.2f}× ({tps['32-one-after-another']} tokens/s) |

Adapter cold load (rank 8, `lorakit.io.load_adapter` from its folder, file in the page cache; goal < 50 ms):
{result['cold_load_ms']} ms, plus {result['first_forward_restack_ms']} ms restacking the per-row weights at the
first forward after the load.
"""


def write_section(section: str, path: Path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md") -> None:
    """Replace (or add) the ``## Serving`` section of BENCHMARKS.md, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Serving\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    import json

    figures = run(quick=False)
    print(json.dumps(figures, indent=2))
    write_section(markdown(figures))
