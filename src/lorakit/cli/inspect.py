"""`lorakit inspect MODEL`: the modules LoRA can target, and what an adapter on them costs.

Parsing and printing only: the model comes from :func:`lorakit.models.load_model`, the
numbers from :func:`lorakit.models.target_footprint`.
"""

from __future__ import annotations

from collections import OrderedDict


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list the modules LoRA can target, with shapes and the adapter's parameter count",
        description=(
            "Load MODEL (default: the embedded MiniLM classifier; default-chat: the embedded "
            "SmolLM2-135M-Instruct; or a model folder / .gguf file) and print the modules an "
            "adapter can target, grouped by name, with the parameters an adapter of rank R "
            "adds on the ones --targets selects (the model family's default when not given)."
        ),
    )
    parser.add_argument("model", nargs="?", default="default", help="default | default-chat | PATH")
    parser.add_argument("--rank", "-r", type=int, default=8, metavar="R", help="adapter rank (default 8)")
    parser.add_argument("--targets", metavar="NAMES",
                        help="comma-separated module names (query,value), all-linear, or a regex matching a "
                             "module's name or path (query|value)")
    parser.add_argument("--paths", action="store_true", help="list every module path instead of grouping by name")
    parser.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from lorakit.config import parse_targets
    from lorakit.models import load_model, target_footprint

    model, _ = load_model(args.model, tokenizer=False)
    report = target_footprint(model, rank=args.rank, targets=parse_targets(args.targets))
    rows = report["modules"]
    if args.paths:
        table = [(path, kind, "x".join(map(str, shape)), "yes" if sel else "", f"{params:,}")
                 for path, kind, shape, sel, params in rows]
        header = ("module", "type", "weight", "target", f"params@r={args.rank}")
    else:
        groups: OrderedDict = OrderedDict()
        for path, kind, shape, sel, params in rows:
            key = (path.rsplit(".", 1)[-1], kind, shape, sel)
            count, total = groups.get(key, (0, 0))
            groups[key] = (count + 1, total + params)
        table = [(name, kind, "x".join(map(str, shape)), str(count), "yes" if sel else "", f"{total:,}")
                 for (name, kind, shape, sel), (count, total) in groups.items()]
        header = ("name", "type", "weight", "count", "target", f"params@r={args.rank}")
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    adapter, total = report["adapter_params"], report["model_params"]
    chosen = sorted({path.rsplit(".", 1)[-1] for path, _, _, sel, _ in rows if sel})
    print(f"\n{type(model).__name__}: {len(rows)} targetable modules, {total:,} parameters")
    print(f"adapter at rank {args.rank} on {','.join(chosen)} ({sum(r[3] for r in rows)} modules): "
          f"{adapter:,} parameters ({100.0 * adapter / total:.4f}% of the model)")
    return 0
