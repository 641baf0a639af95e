"""`lorakit sweep`: train LoRA at several ranks and target sets, and find the smallest good one.

Parsing and printing only; the work is :func:`lorakit.sweep.run_sweep`.
"""

from __future__ import annotations

import argparse

from lorakit.cli.tables import format_table


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
    sweep.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the task's)")
    sweep.add_argument("--tolerance", type=float, default=0.5,
                       help="metric points (percentage points for accuracy) from the best that still count")
    sweep.add_argument("--task", default="classify", help="classify, chat or text")
    sweep.add_argument("--model", default="default", help="'default' or a model folder")
    sweep.add_argument("--data", default="default", help="'default', a .jsonl/.csv file or a folder")
    sweep.add_argument("--alpha", type=float, default=16, help="LoRA alpha, the same for every rank (s = alpha/r)")
    sweep.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's)")
    sweep.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    sweep.add_argument("--max-length", type=int, default=None, help="tokens per example")
    sweep.add_argument("--data-limit", type=int, default=None, help="use only this many training examples")
    sweep.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    sweep.add_argument("--seed", type=int, default=0, help="seed of every run")
    sweep.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sweep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.sweep import run_sweep
    from lorakit.train import TrainingInterrupted

    settings = dict(task=args.task, model=args.model, data=args.data, alpha=args.alpha, lr=args.lr,
                    batch_size=args.batch_size, max_length=args.max_length, data_limit=args.data_limit,
                    eval_every=args.eval_every, seed=args.seed, device=args.device, steps=args.steps)
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
