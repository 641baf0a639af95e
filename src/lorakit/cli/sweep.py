"""`lorakit sweep`: train LoRA at several ranks and target sets, and find the smallest good one.

Parsing and printing only; the work is :func:`lorakit.sweep.run_sweep`.
"""

from __future__ import annotations

import argparse

from lorakit.cli.tables import format_table
from lorakit.cli.train import add_config_flags
from lorakit.train_config import TrainConfig

# TrainConfig fields offered as flags (their help and defaults are TrainConfig's)
RUN_SETTINGS = ("steps", "task", "model", "data", "alpha", "lr", "batch_size", "max_length", "data_limit",
                "eval_every", "seed", "device")


def register(subparsers) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="train LoRA for every rank × target set; print metric, parameters, time, memory",
        description=(
            "Seed 002's recipe for r: train at ranks 1, 2, 4, ... for each target set, compare the validation "
            "metric against the trainable parameters, and mark the smallest configuration within --tolerance "
            "points of the best. Rows are appended to OUT/sweep.jsonl as runs finish; run the same command "
            "again to resume an interrupted sweep."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sweep.add_argument("--ranks", default="1,2,4,8,16,64", help="comma-separated ranks")
    sweep.add_argument("--targets", action="append", metavar="NAMES",
                       help="a target set (query, query,value, all-linear, a regex such as 'query|value'); "
                            "repeat for several "
                            "(default: query and query,value)")
    sweep.add_argument("--out", default="runs/sweep", help="sweep folder (sweep.jsonl, sweep.png, one run per row)")
    sweep.add_argument("--tolerance", type=float, default=0.5,
                       help="metric points (percentage points for accuracy) from the best that still count")
    add_config_flags(sweep, TrainConfig, only=RUN_SETTINGS)  # the same for every run; alpha too (s = alpha/r)
    sweep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.sweep import run_sweep
    from lorakit.train import TrainingInterrupted

    settings = {name: getattr(args, name) for name in RUN_SETTINGS if hasattr(args, name)}  # the flags given
    try:
        result = run_sweep(args.ranks, args.targets or ["query", "query,value"], args.out,
                           tolerance=args.tolerance, **settings)
    except TrainingInterrupted as stop:
        print(f"lorakit sweep: {stop}; finished rows are in {args.out}/sweep.jsonl — run the same command "
              "again to resume", flush=True)
        return 130
    print(format_sweep(result))
    return 0


def format_sweep(result) -> str:
    """The sweep table, the chosen row marked with ``*``."""
    rows = sorted(result.rows, key=lambda r: (r["targets"], r["rank"]))
    if not rows:
        return "no configuration finished"
    name = rows[0]["metric_name"]
    unit = " (%)" if name == "accuracy" else ""
    table = []
    for r in rows:
        mark = "*" if result.chosen is not None and (r["targets"], r["rank"]) == (
            result.chosen["targets"], result.chosen["rank"]) else ""
        table.append([r["targets"], r["rank"], f"{r['trainable_params']:,}", f"{r['points']:.2f}",
                      f"{r['train_time_s']:.1f}", f"{r['peak_memory_bytes'] / 2**20:,.0f}", mark])
    lines = [format_table(["targets", "rank", "trainable", f"val {name}{unit}", "time s", "peak MB", ""], table,
                          align="lrrrrrl")]
    if result.chosen is not None:
        c = result.chosen
        lines.append(f"* smallest within {result.tolerance:g} points of the best: targets {c['targets']}, "
                     f"rank {c['rank']} ({c['trainable_params']:,} trainable parameters, {c['points']:.2f})")
    if result.plot:
        lines.append(f"figure: {result.plot}")
    return "\n".join(lines)
