"""Memory per process under DDP and FSDP: what ``--fsdp`` saves with 2 processes.

The embedded SmolLM2-135M in fp32 (tied embeddings), LoRA r=8 on every linear layer of its
blocks, AdamW, one global batch of 8×256 random tokens split over 2 CPU processes (gloo), or
on 2 GPUs (nccl) where there are. Each mode runs in fresh processes under torchrun; every
process reports:

- the bytes of the parameters it holds between steps (frozen and trainable apart): the whole
  model under DDP, its slice (``DTensor.to_local()``) under FSDP;
- the peak resident set during 3 training steps and before them (the loaded, wrapped or
  sharded model), as :func:`benchmarks.harness.measure_here` measures it; on GPU the
  allocated peak instead;
- the whole process's peak (``ru_maxrss``), loading included: every process loads the whole
  model before FSDP shards it, so this peak is the whole model's in both modes.

Under FSDP a unit's other slices are gathered while it computes: one block at a time, and the
root unit (the tied embedding / output head and the final norm) for the whole forward and
backward, so the peak sits above the slice by about that much.

``python -m benchmarks memory_fsdp [--quick]`` (``--quick``: the tiny Llama, 4×16 tokens).
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import psutil
import torch

from benchmarks import harness

PROCESSES = 2
RANK = 8
STEPS = 3
BATCH, LENGTH = 8, 256  # the global batch
QUICK_BATCH, QUICK_LENGTH = 4, 16
MODES = ("ddp", "fsdp")
GOAL = 0.55  # FSDP's frozen weights per process against DDP's, 2 processes: about half
ROOT = Path(__file__).resolve().parent.parent


def parameter_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the parameters this process holds, frozen and trainable: a sharded
    parameter counts its local slice only."""
    from torch.distributed.tensor import DTensor

    held = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        held["trainable" if p.requires_grad else "frozen"] += local.numel() * local.element_size()
    return held


def _worker(mode: str, quick: bool, out: Path) -> None:
    """One process of a ``mode`` run (started by torchrun): build, shard or wrap, step, report."""
    faulthandler.enable()  # a crash prints every thread's Python stack into the run's stderr
    from lorakit import LoraConfig, distributed
    from lorakit.model import attach
    from lorakit.optimizer import build_optimizer

    runtime = distributed.setup(harness.device(), fsdp=mode == "fsdp")
    batch, length = (QUICK_BATCH, QUICK_LENGTH) if quick else (BATCH, LENGTH)
    state = {}

    def setup():
        model = harness.causal_lm(quick).train()
        state["loaded_mb"] = psutil.Process().memory_info().rss / 2**20
        attach(model, LoraConfig(r=RANK, alpha=16, target_modules="all-linear"))
        state["units"] = distributed.shard(model, runtime)
        model.to(runtime.device)
        wrapped = distributed.wrap(model, runtime)
        optimizer, _ = build_optimizer(model, 1e-3, 0.0, 0.0, STEPS)
        tokens = harness.token_batch(model, batch, length, seed=0)
        mine = {k: v[runtime.rank::runtime.world_size].to(runtime.device) for k, v in tokens.items()}
        state["model"] = model

        def step():
            loss = wrapped(**mine, labels=mine["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    try:
        memory = harness.measure_here(setup, STEPS)
        report = {"rank": runtime.rank, "units": len(state["units"]), "loaded_mb": round(state["loaded_mb"], 1),
                  **{f"{k}_bytes": v for k, v in parameter_bytes(state["model"]).items()},
                  "memory": memory,
                  "whole_process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        (out / f"{mode}-{runtime.rank}.json").write_text(json.dumps(report))
    finally:
        state.clear()  # the wrapped model and its gradient buckets go before their process group
        distributed.teardown(runtime)
    # Leave without the interpreter's finalization: a collective library's thread that touches a
    # Python object while it runs aborts the process (SIGABRT, "terminate called without an active
    # exception", seen once in CI). The report is written; nothing else is left to flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_mode(mode: str, quick: bool, tries: int = 2) -> list[dict]:
    """The reports of every process of one ``mode`` run, by rank.

    A run whose processes die by a signal is started afresh, ``tries`` times in all, each
    failure shown as a warning: a rare abort inside the collective library (seen once in CI)
    is not a measurement. Any other failure raises at once.
    """
    attempt = 1
    while True:
        reports, failure = _run_once(mode, quick)
        if reports is not None:
            return reports
        if attempt >= tries or not any(signal in failure for signal in ("SIGABRT", "SIGSEGV")):
            raise RuntimeError(failure)
        warnings.warn(f"{failure}\nstarting the {mode} run again", RuntimeWarning, stacklevel=2)
        attempt += 1


def _run_once(mode: str, quick: bool) -> tuple[list[dict] | None, str]:
    """One torchrun of ``mode``: the reports by rank, or None and what the run printed."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
             "-m", "benchmarks.memory_fsdp", "--worker", mode, "quick" if quick else "full", tmp],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            return None, f"the {mode} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return [json.loads((Path(tmp) / f"{mode}-{rank}.json").read_text()) for rank in range(PROCESSES)], ""


def run(quick: bool = False) -> dict:
    ranks = {mode: run_mode(mode, quick) for mode in MODES}
    worst = {mode: max(ranks[mode], key=lambda r: r["memory"]["peak_mb"]) for mode in MODES}
    frozen = {mode: max(r["frozen_bytes"] for r in ranks[mode]) for mode in MODES}
    batch, length = (QUICK_BATCH, QUICK_LENGTH) if quick else (BATCH, LENGTH)
    return {
        "machine": harness.machine(), "model": "tiny Llama" if quick else "SmolLM2-135M",
        "processes": PROCESSES, "batch": f"{batch}×{length}", "rank": RANK, "steps": STEPS, "modes": ranks,
        "frozen_vs_ddp": harness.ratio(frozen["fsdp"], frozen["ddp"]),
        "peak_vs_ddp": harness.ratio(worst["fsdp"]["memory"]["peak_mb"], worst["ddp"]["memory"]["peak_mb"]),
        "before_vs_ddp": harness.ratio(worst["fsdp"]["memory"]["before_mb"], worst["ddp"]["memory"]["before_mb"]),
    }


def markdown(result: dict) -> str:
    """The ``## FSDP memory`` section of BENCHMARKS.md."""
    rows = []
    for mode in MODES:
        for r in result["modes"][mode]:
            m = r["memory"]
            rows.append([f"{mode} rank {r['rank']}", _mib(r["frozen_bytes"]), _mib(r["trainable_bytes"]), m["before_mb"],
                         m["peak_mb"], m["added_mb"], r["whole_process_peak_mb"]])
    return f"""## FSDP memory

`python -m benchmarks memory_fsdp`. Machine: {harness.describe(result['machine'])}

{result['model']} in fp32, LoRA r={result['rank']} all-linear, AdamW, global batch {result['batch']} over
{result['processes']} processes, {result['steps']} steps; fresh processes per mode. MiB per process: the
parameters it holds (frozen, trainable), the resident set before the first step and at its peak during the
steps ({result['modes']['ddp'][0]['memory']['method']}), what the steps add, and the whole process's peak
(loading included: each process loads the whole model before FSDP shards it).

{harness.table(["process", "frozen", "trainable", "before steps", "peak in steps", "steps add", "whole-process peak"], rows)}
FSDP against DDP: frozen weights held {result['frozen_vs_ddp']}× (goal ≈ 0.5, ≤ {GOAL}:
{harness.verdict(result['frozen_vs_ddp'], GOAL)}); resident set before the steps {result['before_vs_ddp']}×;
peak during the steps {result['peak_vs_ddp']}×.
"""


def _mib(n: int) -> float:
    return round(n / 2**20, 3)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], sys.argv[3] == "quick", Path(sys.argv[4]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
