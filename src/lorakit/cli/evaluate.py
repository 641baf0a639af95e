"""`lorakit eval`: score trained adapters on their test split or on a file."""

from __future__ import annotations

from lorakit.data.files import FORMATS
from lorakit.tasks import per_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="score trained adapters (their test split, or --data FILE)",
        description="Evaluate what lorakit train saved: accuracy and loss for a classifier, loss and perplexity "
                    "per token for a language model. Several --adapter flags are scored one after the other.",
    )
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR",
                        help="a run folder of lorakit train (--out), or the adapter (or full model) folder in it; "
                             "repeat to compare")
    parser.add_argument("--data", default=None, help=f"a {FORMATS} file to score whole (default: the test split "
                                                     "of the data the adapter was trained on)")
    for key in ("text", "label", "prompt", "completion", "messages"):
        parser.add_argument(f"--{key}-column", default=None, metavar="NAME",
                            help=f"the column of --data holding the {key}, when it is named otherwise than in "
                                 "training")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"examples per forward pass (default: the task's: {per_task('default_eval_batch_size')})")
    parser.add_argument("--model", default=None, help="base model: 'default' or a folder (default: the adapter's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.distributed import pick_device
    from lorakit.inference import evaluate_trained, load_trained

    trained = load_trained(args.adapter, merge=args.merge, model=args.model, device=pick_device(args.device))
    columns = {key: getattr(args, f"{key}_column") for key in ("text", "label", "prompt", "completion", "messages")
               if getattr(args, f"{key}_column")}
    results = evaluate_trained(trained, args.data, args.batch_size, columns=columns, progress=True)
    split = "test" if args.data is None else "data"
    warnings = []
    for name, metrics in results.items():
        shown = ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                          for key, value in metrics.items() if not isinstance(value, dict))
        print(f"{name}: {shown}")
        rows = trained.task.report_rows(split, metrics)
        width = max(len(row_name) for row_name, _ in rows)
        print("\n".join(f"  {row_name:<{width}}  {value}" for row_name, value in rows))
        verdict = trained.task.verdict(metrics, split)
        if verdict:
            warnings.append(f"{name}: {verdict}" if len(results) > 1 else verdict)
    for line in warnings:  # at the end, where they are seen
        print(line)
    return 0
