"""Rank sweeps: train every (targets, rank) configuration and find the smallest good one.

Seed 002, "Process for determining the optimal rank r": start at r = 1 or 2, raise r
(4, 8, ...) while the validation metric improves, then try adapting more matrices
(W_q and W_v together) at the same low rank, and compare metric against cost. The
LoRA paper's Table 6 (seed 002, "What is the optimal rank") found r = 1 enough for
{W_q, W_v} on GPT-3 while W_q alone needed more.

Each configuration is one :func:`lorakit.train.train` run in its own folder under
``out``; its row is appended to ``out/sweep.jsonl`` as soon as it finishes, so an
interrupted sweep started again with the same ``out`` skips the finished rows and
resumes an interrupted run from its checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit import atomic
from lorakit.errors import LorakitError
from lorakit.report import peak_rss_since_reset, reset_peak_rss

__all__ = ["SWEEP_FILE", "SweepResult", "choose_smallest", "parse_ranks", "parse_targets", "run_sweep"]

SWEEP_FILE = "sweep.jsonl"
#: settings every row of one sweep folder must share (a resume with others is refused)
SHARED = ("task", "model", "data", "method", "steps", "epochs", "batch_size", "lr", "alpha", "seed",
          "data_limit", "max_length")


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]`` (sorted, unique).

    Raises:
        LorakitError: an entry that is not a positive integer.
    """
    ranks = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise LorakitError(f"--ranks entry {part!r} is not a positive integer; give e.g. 1,2,4,8,16,64")
        ranks.add(int(part))
    if not ranks:
        raise LorakitError(f"--ranks {text!r} names no rank; give e.g. 1,2,4,8,16,64")
    return sorted(ranks)


def parse_targets(values) -> list[str]:
    """``["query", "value,query", "query|value"]`` -> canonical target strings, unique, in order:
    names sorted inside each list, a regular expression kept as typed (the one rule for both is
    :func:`lorakit.config.parse_targets`)."""
    from lorakit.config import parse_targets as parse_one

    out = []
    for value in values or []:
        value = str(value).strip()
        parsed = parse_one(value)
        canon = ",".join(sorted(set(parsed))) if isinstance(parsed, list) else value
        if canon not in out:
            out.append(canon)
    return out


def _folder_name(targets: str, rank: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.,-]+", "_", targets).replace(",", "+") + f"-r{rank}"


def _points(metric_name: str, value: float) -> float:
    """The metric in the unit tolerances are given in: percentage points for accuracy."""
    return 100.0 * value if metric_name == "accuracy" else value


def choose_smallest(rows: list[dict], tolerance: float = 0.5, higher_is_better: bool = True) -> dict | None:
    """The row with the fewest trainable parameters whose ``points`` lie within ``tolerance`` of the best.

    Ties on parameters go to the better metric. None when no row has a metric.
    """
    scored = [r for r in rows if r.get("points") is not None]
    if not scored:
        return None
    best = (max if higher_is_better else min)(r["points"] for r in scored)
    good = [r for r in scored if (r["points"] >= best - tolerance if higher_is_better
                                  else r["points"] <= best + tolerance)]
    sign = -1 if higher_is_better else 1
    return min(good, key=lambda r: (r["trainable_params"], sign * r["points"]))


@dataclass
class SweepResult:
    """Every finished row (file order), the chosen one, and where things are."""

    rows: list[dict]
    chosen: dict | None
    out: Path
    plot: Path | None = None
    tolerance: float = 0.5
    skipped: list[dict] = field(default_factory=list)  # rows found finished in the file


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines):
                raise LorakitError(f"{path} line {n} is not JSON; fix or remove the file") from None
            # the last line was cut by a crash mid-write: its configuration is trained again
    return rows


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _row_from_report(report: dict, targets: str, rank: int, folder: Path) -> dict:
    metric = report["metric"]
    value = report["validation_after"][metric]
    return {
        "targets": targets, "rank": rank, "trainable_params": report["trainable_params"],
        "metric_name": metric, "metric": value, "points": _points(metric, value),
        "test": (report.get("test") or {}).get(metric), "train_time_s": report["train_time_s"],
        "wall_time_s": report["wall_time_s"], "peak_memory_bytes": report["memory"].get(
            "cuda_peak_allocated_bytes", report["memory"].get("peak_rss_bytes")),
        "folder": str(folder), "settings": {k: report["settings"].get(k) for k in SHARED},
    }


def run_sweep(ranks, targets, out, *, tolerance: float = 0.5, train_fn: Callable | None = None,
              plot: bool = True, say: Callable = print, **train_settings) -> SweepResult:
    """Train every ``targets × ranks`` configuration (LoRA) and pick the smallest good one.

    Args:
        ranks: e.g. ``[1, 2, 4, 8, 16, 64]`` (or ``"1,2,4"``).
        targets: target sets, e.g. ``["query", "query,value", "all-linear"]``.
        out: the sweep folder: ``sweep.jsonl``, ``sweep.png`` and one run folder per configuration.
        tolerance: in metric points (percentage points for accuracy): the chosen row is the
            one with the fewest trainable parameters within ``tolerance`` of the best.
        train_fn: ``TrainConfig -> report dict`` (default :func:`lorakit.train.train`).
        plot: write ``sweep.png`` (metric against trainable parameters).
        train_settings: any other :class:`lorakit.train.TrainConfig` field (``steps``,
            ``task``, ``model``, ``data``, ``lr``, ``seed``, ``batch_size``, ...).

    Returns:
        :class:`SweepResult`. Rows are appended to ``out/sweep.jsonl`` one per finished
        configuration; running again with the same ``out`` skips them.

    Raises:
        LorakitError: bad ranks/targets, or ``out`` holds a sweep made with other settings.
        lorakit.train.TrainingInterrupted: Ctrl-C; finished rows and the run's checkpoint are kept.
    """
    import torch

    from lorakit.run_folder import RunFolder
    from lorakit.tasks import get_task
    from lorakit.train import TrainConfig, train

    ranks = parse_ranks(ranks) if isinstance(ranks, str) else parse_ranks(",".join(map(str, ranks)))
    targets = parse_targets([targets] if isinstance(targets, str) else targets)
    if not targets:
        raise LorakitError("give at least one --targets set, e.g. --targets query --targets query,value")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise LorakitError(f"tolerance must be a number ≥ 0, got {tolerance!r}")
    if train_settings.get("method", "lora") != "lora":
        raise LorakitError(f"a rank sweep trains LoRA adapters; method {train_settings['method']!r} is not swept")
    train_fn = train_fn or train
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; give a folder for the sweep")
    atomic.check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / SWEEP_FILE
    done = _read_rows(jsonl)
    finished = {(r["targets"], r["rank"]) for r in done}

    rows, skipped = list(done), list(done)
    plan = [(t, r) for t in targets for r in ranks]
    for i, (t, r) in enumerate(plan, 1):
        if (t, r) in finished:
            continue
        folder = out / _folder_name(t, r)
        config = TrainConfig(rank=r, targets=t, out=str(folder), **train_settings)
        shared = {k: config.settings().get(k) for k in SHARED}
        clash = next((row for row in done if row.get("settings") != shared), None)
        if clash is not None:
            diff = {k: (clash["settings"].get(k), v) for k, v in shared.items() if clash["settings"].get(k) != v}
            raise LorakitError(f"{jsonl} holds a sweep made with other settings ({diff}); use another --out "
                               "or the same flags to resume it")
        config.resume = RunFolder(folder).has_checkpoint()
        say(f"sweep {i}/{len(plan)}: targets {t}, rank {r}" + (" (resuming)" if config.resume else ""))
        reset = reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # cuda_peak_allocated_bytes of this run alone
        report = train_fn(config)
        row = _row_from_report(report, t, r, folder)
        row["settings"] = shared  # as given, not as the recipe filled them in: a resume compares these
        peak = peak_rss_since_reset() if reset else None
        if peak is not None and "cuda_peak_allocated_bytes" not in report["memory"]:
            row["peak_memory_bytes"] = peak  # this run's peak, not the process's
        _append_row(jsonl, row)
        rows.append(row)
        done.append(row)

    higher = get_task(train_settings.get("task", "classify")).higher_is_better
    chosen = choose_smallest(rows, tolerance, higher)
    figure = None
    if plot and rows:
        figure = _plot(rows, chosen, out, rows[0]["metric_name"])
    return SweepResult(rows=rows, chosen=chosen, out=out, plot=figure, tolerance=tolerance, skipped=skipped)


def _plot(rows: list[dict], chosen: dict | None, out: Path, metric_name: str) -> Path:
    from lorakit.plots import plot_sweep

    points = [{**r, "metric": r["points"]} for r in rows]
    unit = " (%)" if metric_name == "accuracy" else ""
    return plot_sweep(points, out / "sweep.png", metric=f"validation {metric_name}{unit}",
                      chosen={**chosen, "metric": chosen["points"]} if chosen else None)
