"""What a training run tells its user: the metrics log, peak memory, sizes, the final report."""

from __future__ import annotations

import json
import resource
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from lorakit import atomic


def peak_memory_bytes(device: torch.device | None = None) -> dict:
    """Peak memory of this process so far, in bytes.

    Returns:
        ``{"peak_rss_bytes": ...}``: the resident set size high-water mark
        (``ru_maxrss``, which covers the whole process life, model loading included),
        plus ``"cuda_peak_allocated_bytes"`` (``torch.cuda.max_memory_allocated``) on a GPU.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": int(maxrss if sys.platform == "darwin" else maxrss * 1024)}  # Linux: KiB
    if device is not None and device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux ``/proc/self/clear_refs``).

    ``ru_maxrss`` covers the whole process life; after a reset, :func:`peak_rss_since_reset`
    is the peak of what ran since. Returns False where the kernel offers no reset.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int | None:
    """``VmHWM`` of ``/proc/self/status`` in bytes, or None where there is no such file."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class StepMemory:
    """Peak resident memory while training steps run (evaluation and checkpoint writing
    left out), sampled by a background thread every ``interval`` seconds.

    ``ru_maxrss`` covers the whole process (model loading, saving); this isolates what
    the optimizer steps need: weights, activations, gradients, optimizer state.
    """

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._active = threading.Event()
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            if self._active.wait(timeout=0.1):
                self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
                self._stop.wait(self._interval)

    @contextmanager
    def measuring(self):
        """Count the memory of the code inside the ``with`` block."""
        self._active.set()
        try:
            yield
        finally:
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            self._active.clear()

    def close(self) -> int:
        """Stop the sampling thread; return the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def folder_size(path) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line, ``{"step": ..., ...}``.

    Training lines carry ``loss``, ``lr``, ``grad_norm``; evaluation lines carry
    ``split: "validation"`` and the task's metrics. Opening it for a resumed run drops
    the lines after the checkpoint's step, so the file reads as one uninterrupted run.
    """

    def __init__(self, path, keep_until_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_step is not None and self.path.is_file():
            kept = [line for line in read_metrics(self.path) if line["step"] <= keep_until_step]
        atomic.write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def write(self, **fields) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(fields) + "\n")


def read_metrics(path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` (a partly written last line is skipped)."""
    lines = []
    with open(path) as handle:
        for text in handle:
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                break
    return lines


def _mb(n) -> str:
    """Bytes as MB (or kB below 1 MB), for people."""
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} kB"


def format_report(report: dict) -> str:
    """The final report as a few aligned lines for the terminal: the task's own lines for
    the scored split (``report_rows``: a classifier's beside its majority-class baseline),
    and last the warning, if any, that the model did not beat that baseline, and why where it can tell."""
    metric = report["metric"]
    before, after, test = report["validation_before"], report["validation_after"], report.get("test") or {}

    def show(metrics):
        value = metrics.get(metric)
        return "n/a" if value is None else (f"{value:.4f}" if metric != "accuracy" else f"{value:.3f}")

    memory = report["memory"]
    rows = [
        ("task", f"{report['task']} ({report['data']['source']}; train/validation/test = "
                 f"{report['data']['train']}/{report['data']['validation']}/{report['data']['test']})"),
        ("method", f"{report['method']}" + (f" r={report['rank']} alpha={report['alpha']} on {','.join(report['targets'] or [])}"
                                            if report["method"] != "full" else "")),
        ("trainable params", f"{report['trainable_params']:,} of {report['total_params']:,} "
                             f"({report['trainable_percent']:.3f}%)"),
        ("steps", f"{report['steps']} x global batch {report['global_batch']} ({report['world_size']} process(es), "
                  f"{'bf16 mixed precision' if report.get('bf16') else 'fp32'})"),
        (f"validation {metric}", f"{show(before)} before -> {show(after)} after (best at step {report['best_step']})"),
        *(report.get("report_rows") or [(f"test {metric}", show(test) if test else "n/a (no test split)")]),
        ("wall time", f"{report['wall_time_s']:.1f} s (training loop {report['train_time_s']:.1f} s)"),
        ("peak memory", _mb(memory["peak_rss_bytes"]) + " RSS"
         + (f" (training steps: {_mb(memory['train_steps_peak_rss_bytes'])})" if "train_steps_peak_rss_bytes" in memory
            else "")
         + (f", {_mb(memory['cuda_peak_allocated_bytes'])} CUDA" if "cuda_peak_allocated_bytes" in memory else "")),
        ("saved to", f"{report['saved_to']} ({_mb(report['saved_bytes'])})"),
        ("report", ", ".join(report[key] for key in ("report_path", "metrics_path", "plot_path", "confusion_path",
                                                           "scatter_path")
                             if report.get(key))),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines + [report[key] for key in ("warning", "why") if report.get(key)])
