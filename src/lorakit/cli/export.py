"""`lorakit export`: an adapter merged into its base, written as a plain transformers folder.

Parsing and printing only; the work is :func:`lorakit.export.export_merged`.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="merge an adapter into its base and write a plain transformers model folder",
        description=(
            "Load the base model the adapter records (or --model) from its original full-precision weights, "
            "merge the adapter in fp32 and write config, weights and tokenizer to --merged: a folder that "
            "AutoModel*.from_pretrained loads without lorakit. An adapter trained on a quantized base "
            "(--quantize nf4) is merged into the full-precision base, not into the quantized one."
        ),
    )
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder (lorakit train's or PEFT's)")
    parser.add_argument("--merged", required=True, metavar="OUT", help="the model folder to write (new or empty)")
    parser.add_argument("--model", default=None, metavar="M",
                        help="the base model (default: the one the adapter records)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the written weights (default: the base's own)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.export import export_merged

    done = export_merged(args.adapter, args.merged, model=args.model, dtype=args.dtype)
    print(f"wrote {done['out']}: {done['class']} ({done['model']} with {args.adapter} merged), {done['dtype']}, "
          f"{done['bytes'] / 1e6:.1f} MB; load it with transformers' from_pretrained")
    return 0
