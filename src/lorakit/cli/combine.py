"""`lorakit combine`: several adapter folders into one; the work is :func:`lorakit.combination.combine_adapters`.

The method and majority-sign names are checked by the library (one line, exit 2), so that
``lorakit --help`` does not import torch models to list them.
"""

from __future__ import annotations

import argparse

from lorakit.errors import LorakitError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "combine", help="combine adapters trained on the same base into one (cat, svd, ties, dare, ...)",
        description="Combine adapter folders into a new PEFT-format adapter whose ΔW is the weighted combination "
                    "of theirs, per layer: cat (exact, the ranks add up), svd (the weighted sum truncated to rank R), "
                    "magnitude_prune, ties, dare_linear, dare_ties (each ΔW pruned to a density first, then "
                    "truncated to rank R). No base model is loaded.",
    )
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR=WEIGHT",
                        help="an adapter folder and its weight, e.g. runs/sql/adapter=0.5 (repeat for each adapter)")
    parser.add_argument("--method", default="cat",
                        help="cat (the default, exact), svd, magnitude_prune, ties, dare_linear or dare_ties")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the result, all methods but cat (default: the largest input rank)")
    parser.add_argument("--density", type=float, default=None,
                        help="fraction of each ΔW's entries kept, in (0, 1]: needed by magnitude_prune, ties, "
                             "dare_linear and dare_ties")
    parser.add_argument("--majority-sign", default="total",
                        help="ties / dare_ties: elect each entry's sign by the sum of the ΔW (total, the default) "
                             "or by how many have it (frequency)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random masks of dare_* (default: 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    parser.set_defaults(func=run)


def parse_adapter(text: str) -> tuple[str, float]:
    """``"DIR=0.5"`` -> ``("DIR", 0.5)`` (the last ``=`` splits, so a folder may hold one).

    Raises:
        LorakitError: no ``=WEIGHT``, or a weight that is not a number.
    """
    folder, sep, weight = text.rpartition("=")
    if not sep or not folder:
        raise LorakitError(f"--adapter {text!r} needs a weight: give DIR=WEIGHT, e.g. {text}=0.5")
    try:
        return folder, float(weight)
    except ValueError:
        raise LorakitError(f"--adapter {text!r}: the weight {weight!r} is not a number; give DIR=WEIGHT") from None


def run(args: argparse.Namespace) -> int:
    from lorakit.combination import combine_adapters
    from lorakit.run_folder import adapter_folder  # a run folder of lorakit train stands for its adapter/

    adapters: dict[str, float] = {}
    for text in args.adapter:
        folder, weight = parse_adapter(text)
        folder = str(adapter_folder(folder))
        if folder in adapters:
            raise LorakitError(f"adapter {folder} is given twice; give each folder once with its weight")
        adapters[folder] = weight
    out = combine_adapters(adapters, args.out, args.method, args.rank, density=args.density,
                           majority_sign=args.majority_sign, seed=args.seed)
    print(f"combined {len(adapters)} adapters by {args.method}: {out}")
    return 0
