"""What every side-by-side benchmark shares: the machine, interleaved timing, peak memory.

- :func:`machine` describes where the figures come from (CPU model, cores, threads, torch;
  the GPU when CUDA is used), :func:`machine_name` makes a file name of it.
- :func:`interleaved` times contenders A B C A B C ... after a warm-up round, so that a
  change in machine load hits all of them alike; :func:`median_ms` and :func:`ratio`
  summarise.
- :func:`peak_memory` measures one contender in a fresh subprocess: on CPU the peak
  resident set size (the kernel's high-water mark ``VmHWM``, reset just before the
  measured steps), on GPU ``torch.cuda.max_memory_allocated``. A fresh process per
  contender is the honest way on CPU: the allocator keeps freed pages, so a second
  contender in the same process would inherit the first one's heap.
- :func:`tiny_classifier`, :func:`tiny_causal_lm`, :func:`classifier`, :func:`causal_lm`:
  the models, tiny random ones for ``quick=True`` (the smoke test), else the embedded ones.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from importlib import import_module
from typing import Callable

import torch

from lorakit.report import peak_rss_since_reset, reset_peak_rss

# ---------------------------------------------------------------------- the machine


def clock() -> str:
    """``"wall"`` (the default) or ``"cpu"``: ``LORAKIT_BENCH_CLOCK=cpu`` times this process's
    CPU seconds (``time.process_time``) instead of wall seconds, for a CPU shared with other
    jobs: time spent waiting for a core is not counted, the work is. Use it with one torch
    thread (``OMP_NUM_THREADS=1``), where CPU time is the work of the one thread."""
    value = os.environ.get("LORAKIT_BENCH_CLOCK", "wall")
    if value not in ("wall", "cpu"):
        raise ValueError(f"LORAKIT_BENCH_CLOCK must be 'wall' or 'cpu', got {value!r}")
    return value


def reps(n: int) -> int:
    """``n`` repetitions times ``LORAKIT_BENCH_REPS`` (default 1): more samples for a noisy machine,
    where one forward or step varies by more than the differences a table is after."""
    value = os.environ.get("LORAKIT_BENCH_REPS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LORAKIT_BENCH_REPS must be a whole number of at least 1, got {value!r}")
    return n * int(value)


def device() -> str:
    """``"cuda"`` when a GPU is usable (``LORAKIT_BENCH_DEVICE`` overrides), else ``"cpu"``."""
    return os.environ.get("LORAKIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    """The CPU's model name, e.g. ``Intel(R) Xeon(R) Processor``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict:
    """Where the figures come from: CPU model, logical cores, torch threads and version, GPU."""
    import psutil

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device(),
        "clock": clock(),
    }
    for package in ("transformers", "peft"):
        try:
            info[package] = import_module(package).__version__
        except ImportError:
            info[package] = None
    if info["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def title(name: str, info: dict) -> str:
    """A section's heading: ``## Training step`` for the figures BENCHMARKS.md takes by default
    (1 torch thread, CPU seconds, or a GPU), ``## Training step (2 threads, wall clock)`` else."""
    if info.get("gpu"):
        return f"## {name} (GPU)"
    if info.get("clock") == "cpu" and info["threads"] == 1:
        return f"## {name}"
    return f"## {name} ({info['threads']} thread{'s' if info['threads'] != 1 else ''}, {info['clock']} clock)"


def describe(info: dict) -> str:
    """One line for BENCHMARKS.md: ``Intel Xeon, 2 cores, 2 torch threads, torch 2.13.0, ...``."""
    threads = f"{info['threads']} torch thread{'s' if info['threads'] != 1 else ''}"
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores, {threads}"
    timing = " Times are process CPU seconds, not wall seconds." if info.get("clock") == "cpu" else ""
    return (f"{where}, {info['memory_gb']} GiB RAM; torch {info['torch']}, transformers {info['transformers']}, "
            f"peft {info['peft']}, Python {info['python']}.{timing}")


def machine_name(info: dict | None = None) -> str:
    """A file-name-safe name saying what the machine is: ``cpu-intel-xeon-processor-2c-2t``
    or ``cuda-nvidia-h100-80gb-hbm3``. ``LORAKIT_BENCH_MACHINE`` overrides it."""
    if os.environ.get("LORAKIT_BENCH_MACHINE"):
        name = os.environ["LORAKIT_BENCH_MACHINE"]
    else:
        info = info or machine()
        if info.get("gpu"):
            name = f"cuda-{info['gpu']}"
        else:
            cpu = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", "", info["cpu"], flags=re.I)
            name = f"cpu-{cpu}-{info['cores']}c-{info['threads']}t" + ("-cputime" if info.get("clock") == "cpu" else "")
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", name.strip().lower())
    return re.sub(r"-+", "-", name).strip("-") or "machine"


# ---------------------------------------------------------------------- timing


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (GPU work included); CPU seconds with :func:`clock` ``"cpu"``."""
    now = time.process_time if clock() == "cpu" and device() == "cpu" else time.perf_counter
    sync()
    start = now()
    fn()
    sync()
    return now() - start


def interleaved(contenders: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                inner: int = 1) -> dict[str, list[float]]:
    """Time each contender ``reps`` times, alternating A B C A B C ..., after ``warmup`` rounds.

    Each sample is the mean of ``inner`` back-to-back calls (for calls too short to time
    alone). The order rotates each round so no contender always follows the same one.

    Returns:
        name -> list of ``reps`` samples, seconds per call.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn = contenders[name]
            samples[name].append(timed(lambda: [fn() for _ in range(inner)]) / inner)
    return samples


def median_ms(samples: list[float]) -> float:
    """Median of samples in seconds, as milliseconds (3 decimals)."""
    return round(statistics.median(samples) * 1000, 3)


def time_forwards(models: dict, inputs: dict, reps: int, warmup: int) -> tuple[dict, dict]:
    """Forward each model on ``inputs`` under inference mode, contenders interleaved.

    Returns ``(samples, ms)``: the seconds of every repetition and the median in ms, by name.
    """
    calls = {name: (lambda m=m: m(**inputs)) for name, m in models.items()}
    with torch.inference_mode():
        samples = interleaved(calls, reps=reps, warmup=warmup)
    return samples, {name: median_ms(s) for name, s in samples.items()}


# aten operators that launch no kernel: views, metadata, allocations (the rest each run at least one)
_NO_KERNEL = frozenset({
    "view", "_unsafe_view", "t", "transpose", "expand", "permute", "slice", "select", "detach", "alias", "unsqueeze",
    "squeeze", "narrow", "as_strided", "reshape", "_reshape_alias", "split", "split_with_sizes", "unbind", "chunk",
    "lift_fresh", "unflatten", "flatten", "numel", "sym_size", "is_same_size", "empty", "new_empty",
    "new_empty_strided", "empty_like", "empty_strided", "_record_function_enter_new", "_record_function_exit"})


def kernel_ops(step: Callable[[], object], optimizer=None) -> int:
    """How many aten operators that compute (views and allocations left out) one call of ``step``
    dispatches, ``optimizer``'s step left out: on a GPU each launches at least one kernel, and at
    small sizes the launches are what a step waits on. Counted below autograd, so backward's too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counting = [True]

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counting[0] and func.overloadpacket.__name__ not in _NO_KERNEL:
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    hooks = []
    if optimizer is not None:
        hooks = [optimizer.register_step_pre_hook(lambda *_: counting.__setitem__(0, False)),
                 optimizer.register_step_post_hook(lambda *_: counting.__setitem__(0, True))]
    try:
        with Count():
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return Count.ops


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def paired_overhead(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``samples[name][i] - samples[reference][i]``, in ms.

    The two were timed in the same round (see :func:`interleaved`), so the difference
    of a pair cancels the load the machine had during that round better than the
    difference of two medians does.
    """
    diffs = [a - b for a, b in zip(samples[name], samples[reference])]
    return round(statistics.median(diffs) * 1000, 3)


def paired_ratio(samples: dict[str, list[float]], name: str, reference: str) -> float | None:
    """Median over rounds of ``samples[name][i] / samples[reference][i]`` (3 decimals).

    On a machine whose speed drifts between rounds (a VM: one SmolLM2 step varies by ±12% in CPU
    seconds here), the ratio within a round, where the contenders ran seconds apart, cancels the
    drift that a ratio of two medians keeps."""
    ratios = [a / b for a, b in zip(samples[name], samples[reference]) if b]
    return round(statistics.median(ratios), 3) if ratios else None


def paired_note(parts: list[str]) -> str:
    """The sentence under a table of ratios of medians that gives each round's own ratio
    (:func:`paired_ratio`) for each part, e.g. ``"MiniLM: lorakit / floor 0.993"``."""
    return ("The ratios above are of medians. Each round's own ratio, its median over the rounds (which cancels the "
            f"drift of the machine's speed between rounds): {'; '.join(parts)}.")


# ---------------------------------------------------------------------- peak memory


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _Sampler:
    """Polls the RSS every millisecond: the fallback where ``VmHWM`` cannot be reset."""

    def __init__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure_here(setup: Callable[[], Callable[[], object]], steps: int) -> dict:
    """Peak memory of ``steps`` calls of the step function ``setup()`` returns, in this process.

    Returns:
        ``peak_mb`` (the peak during the steps: RSS on CPU, allocated on GPU),
        ``before_mb`` (after setup, before the first step) and ``added_mb`` (their
        difference: what the steps allocate: activations, gradients, optimizer state),
        all in MiB, and ``method``.
    """
    step = setup()
    gc.collect()
    if device() == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        before = _rss_bytes()
        if reset_peak_rss():
            for _ in range(steps):
                step()
            peak, method = peak_rss_since_reset(), "peak RSS (VmHWM, reset after setup)"
        else:
            with _Sampler() as sampler:
                for _ in range(steps):
                    step()
            peak, method = sampler.peak, "peak RSS (sampled every 1 ms)"
    mib = 2**20
    return {"peak_mb": round(peak / mib, 1), "before_mb": round(before / mib, 1),
            "added_mb": round((peak - before) / mib, 1), "method": method}


def peak_memory(target: str, steps: int = 3, **kwargs) -> dict:
    """Peak memory of one contender, measured in a fresh Python process.

    Args:
        target: ``"module:function"``; ``function(**kwargs)`` builds the contender
            (model, optimizer, batch) and returns its zero-argument step function.
        steps: steps run after setup (the first allocates gradients and optimizer state).
        kwargs: JSON-serialisable arguments for ``function``.

    Returns:
        see :func:`measure_here`.

    Raises:
        RuntimeError: the subprocess failed (its stderr's tail is in the message).
    """
    spec = json.dumps({"target": target, "steps": steps, "kwargs": kwargs})
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", spec], capture_output=True, text=True,
                          env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {target} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(spec: str) -> None:
    spec = json.loads(spec)
    module, function = spec["target"].split(":")
    setup = getattr(import_module(module), function)
    print(json.dumps(measure_here(lambda: setup(**spec["kwargs"]), spec["steps"])))


# ---------------------------------------------------------------------- models and inputs


def adamw_step(model, batch: dict, lr: float = 1e-4):
    """A zero-argument training step of ``model`` on ``batch`` (AdamW on its trainable parameters;
    returns the loss), with ``step.model`` and ``step.trainable`` (the count of trained values)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss

    step.model, step.trainable = model, sum(p.numel() for p in params)
    return step


def shared_copy(model):
    """A copy of ``model``'s modules that holds the very same parameter and buffer tensors, for the
    contenders that never write the frozen weights. Two separate copies of one model can run its
    GEMMs a few percent apart on a CPU (their pages lie elsewhere: measured 3 points on SmolLM2 at
    1×128, BENCHMARKS.md), which is the copy's doing, not the method's; contenders that share the
    weights compare the methods alone. A contender that writes them (merged, full fine-tuning) gets
    a copy of its own."""
    import copy
    import itertools

    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def tiny_classifier(seed: int = 0):
    """A 2-layer random BERT classifier (hidden 32) with the module names of the real one."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config).eval()


def tiny_causal_lm(seed: int = 0):
    """A 2-layer random Llama (hidden 32) with SmolLM2's module names and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def random_weights() -> bool:
    """``LORAKIT_BENCH_RANDOM_WEIGHTS=1``: build the real models' architectures from their configs
    (``benchmarks/configs/``) with random weights, where the embedded packages are not installed
    (a GPU machine without network). Times do not depend on the weights' values."""
    return os.environ.get("LORAKIT_BENCH_RANDOM_WEIGHTS", "0") not in ("", "0")


def from_config(name: str, seed: int = 0):
    """The model of ``configs/<name>.json`` with random weights (seeded), fp32, eval mode."""
    from transformers import AutoConfig, BertForSequenceClassification, LlamaForCausalLM

    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        settings = json.load(f)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model_class = BertForSequenceClassification if config.model_type == "bert" else LlamaForCausalLM
    return model_class(config).eval()


def model_name(real: str, quick: bool, tiny: str) -> str:
    """How a result names its model: the tiny one, the real one, or its architecture with random weights."""
    return tiny if quick else f"{real} (random weights)" if random_weights() else real


def classifier(quick: bool):
    """The embedded MiniLM-L6 sequence classifier (2 labels), or the tiny one; eval mode, fp32."""
    if quick:
        return tiny_classifier()
    if random_weights():
        return from_config("minilm-l6")
    from lorakit.models import load_classifier

    return load_classifier("default", tokenizer=False)[0]


def causal_lm(quick: bool):
    """The embedded SmolLM2-135M-Instruct in fp32, or the tiny Llama; eval mode."""
    if quick:
        return tiny_causal_lm()
    if random_weights():
        return from_config("smollm2-135m")
    from lorakit.models import load_causal_lm

    return load_causal_lm("default-chat", tokenizer=False)[0]


def compile_backend() -> str | None:
    """The ``torch.compile`` backend of the compiled contenders: ``LORAKIT_BENCH_COMPILE`` (default
    ``inductor``, what ``lorakit train --compile`` uses; ``0`` leaves them out: compiling a model
    takes minutes on a small CPU; ``aot_eager`` captures the graphs without generating code)."""
    value = os.environ.get("LORAKIT_BENCH_COMPILE", "inductor")
    return None if value in ("", "0") else value


def autocast_dtype() -> torch.dtype | None:
    """``LORAKIT_BENCH_AUTOCAST=bf16``: the training steps run under bf16 autocast (as
    ``lorakit train`` does where the hardware computes bf16: GPUs, AMX CPUs); default fp32."""
    value = os.environ.get("LORAKIT_BENCH_AUTOCAST", "")
    if value in ("", "0", "fp32"):
        return None
    if value != "bf16":
        raise ValueError(f"LORAKIT_BENCH_AUTOCAST must be bf16 or fp32, got {value!r}")
    return torch.bfloat16


INFERENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inference_dtypes() -> list[str]:
    """``LORAKIT_BENCH_INFER_DTYPES``: the dtypes the inference benchmark casts the model to, one
    pass each (default ``fp32``; ``fp32,bf16`` adds the bf16 weights GPU users serve with)."""
    value = os.environ.get("LORAKIT_BENCH_INFER_DTYPES", "") or "fp32"
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in INFERENCE_DTYPES]
    if bad or not names:
        raise ValueError(f"LORAKIT_BENCH_INFER_DTYPES must list {' or '.join(INFERENCE_DTYPES)}, got {value!r}")
    return names


def compile_enabled() -> bool:
    return compile_backend() is not None


def token_batch(model, batch: int, length: int, seed: int = 0) -> dict:
    """Random token ids ``(batch, length)`` (below 1000 or the vocabulary) and an all-ones mask."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 1000)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    return {"input_ids": ids.to(device()), "attention_mask": torch.ones_like(ids).to(device())}


def linear_flops_floor(model, r: int) -> dict:
    """The unmerged LoRA forward's FLOP floor over the adapted layers, for rank ``r``.

    ``Σ r(d+k) / Σ d·k`` over the LoRA layers of ``model`` (lorakit-wrapped), the extra
    multiply-adds of ``B(Ax)`` against those of ``Wx`` (LoRA §4.1). Also the same extra
    against every ``nn.Linear`` of the model (head included), a floor for the whole forward
    without attention's own matmuls.
    """
    from lorakit.model import lora_layers

    extra = base = 0
    for _, layer in lora_layers(model):
        d, k = layer.out_features, layer.in_features
        extra += r * (d + k)
        base += d * k
    every = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    every += base  # the wrapped ones are no longer nn.Linear
    return {"floor_adapted": round(extra / base, 4), "floor_all_linear": round(extra / every, 4),
            "adapted_layers": sum(1 for _ in lora_layers(model))}


if __name__ == "__main__":
    _child(sys.argv[1])


# ---------------------------------------------------------------------- Markdown


def verdict(value: float | None, goal: float) -> str:
    """``yes`` / ``**no**`` for ``value ≤ goal`` (None: ``n/a``)."""
    if value is None:
        return "n/a"
    return "yes" if value <= goal else "**no**"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are written with up to 3 significant decimals."""
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
