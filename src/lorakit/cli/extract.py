"""`lorakit extract`: a LoRA adapter (PEFT format) from a full fine-tune, by truncated SVD of ΔW.

Parsing and printing only; the work is :func:`lorakit.analysis.extract_adapter`.
"""

from __future__ import annotations

import argparse

from lorakit.cli.tables import format_table


def register(subparsers) -> None:
    ext = subparsers.add_parser(
        "extract",
        help="a LoRA adapter from a full fine-tune: truncated SVD of W_tuned − W_base per module",
        description=(
            "Factor each changed linear weight's ΔW = W_tuned − W_base as B·A of rank R (or the rank keeping "
            "a fraction of its energy) and write a PEFT-format adapter; a mixture-of-experts model's fused "
            "experts and router are factored per expert (PEFT's target_parameters); a changed output head is "
            "saved whole (modules_to_save). Prints the rank and relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F per module."
        ),
    )
    ext.add_argument("--base", required=True, metavar="MODEL", help="'default', 'default-chat' or a model folder")
    ext.add_argument("--tuned", required=True, metavar="MODEL_OR_CHECKPOINT",
                     help="the fine-tuned model folder (e.g. from lorakit train --method full), or an adapter "
                          "folder: its update to --base factored again, e.g. at a smaller rank")
    pick = ext.add_mutually_exclusive_group(required=True)
    pick.add_argument("--rank", "-r", type=int, metavar="R", help="rank of every module's factors")
    pick.add_argument("--energy", type=float, metavar="E",
                      help="per module, the smallest rank keeping E of Σσ² (e.g. 0.95)")
    ext.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    ext.add_argument("--module", metavar="PATTERN", help="regular expression selecting module paths")
    ext.add_argument("--lora-bias", action="store_true",
                     help="carry each extracted module's bias change b_tuned − b_base as B's bias (PEFT's lora_bias)")
    ext.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.analysis import extract_adapter

    extraction = extract_adapter(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy,
                                 module=args.module, lora_bias=args.lora_bias)
    rows = [[path, m.rank, f"{m.delta_norm:.4g}", f"{m.relative_error:.4f}", f"{100 * m.energy:.1f}%"]
            for path, m in extraction.modules.items()]
    print(format_table(["module", "r", "‖ΔW‖_F", "rel. error", "energy"], rows))
    if extraction.unchanged:
        print(f"unchanged (no factors): {len(extraction.unchanged)} module(s), e.g. {extraction.unchanged[0]}")
    print(f"{len(extraction.modules)} module(s), {extraction.parameters:,} adapter parameters, "
          f"overall relative error {extraction.relative_error:.4f}")
    if extraction.lora_bias:
        moved = sum(bool(m.bias.any()) for m in extraction.modules.values())
        print(f"bias changes carried as B's bias (lora_bias): {moved} of {len(extraction.modules)} module(s) moved")
    print(f"adapter: {args.out}")
    return 0
