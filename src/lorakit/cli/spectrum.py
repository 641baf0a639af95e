"""`lorakit spectrum`: the singular values of a full fine-tune's ΔW = W_ft − W, per module.

Seed 003's systematic route to r: keep the rank that holds 90/95/99% of ΔW's energy.
Parsing and printing only; the numbers come from :func:`lorakit.analysis.model_spectra`.
"""

from __future__ import annotations

import argparse

from lorakit.cli.tables import format_table


def register(subparsers) -> None:
    spec = subparsers.add_parser(
        "spectrum",
        help="singular values of ΔW = W_tuned − W_base per module, and the ranks keeping 90/95/99%% of the energy",
        description=(
            "SVD of the update a full fine-tune (or an adapter) made to each linear weight (output heads left "
            "out), and the smallest rank holding 90, 95 and 99%% of its energy Σσ² (seed 003)."
        ),
    )
    spec.add_argument("--base", required=True, metavar="MODEL", help="'default', 'default-chat' or a model folder")
    spec.add_argument("--tuned", required=True, metavar="MODEL_OR_CHECKPOINT",
                      help="the fine-tuned model folder (e.g. from lorakit train --method full), or an adapter "
                           "folder (or a LoRA run's folder): the update it makes to --base, to see how much of its "
                           "rank it uses")
    spec.add_argument("--module", metavar="PATTERN", help="regular expression selecting module paths")
    spec.add_argument("--plot", metavar="OUT.png", help="draw the spectra and their cumulative energy")
    spec.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    spec.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.analysis import model_spectra
    from lorakit.plots import check_figure_path

    if args.plot:
        check_figure_path(args.plot, args.overwrite)  # before the work, not after it
    spectra = model_spectra(args.base, args.tuned, module=args.module)
    energies = next(iter(spectra.values())).ranks.keys()
    header = ["module", "shape p", "‖ΔW‖/‖W‖", "σ_1", *[f"r@{100 * e:g}%" for e in energies]]
    rows = [[path, s.full_rank, f"{s.relative_change:.4f}", f"{float(s.sigma[0]):.4g}",
             *[s.ranks[e] for e in energies]] for path, s in spectra.items() if s.delta_norm > 0]
    changed = [s for s in spectra.values() if s.delta_norm > 0]
    unchanged = [path for path, s in spectra.items() if s.delta_norm == 0]
    print(f"spectrum of ΔW = W_tuned − W_base, {len(spectra)} module(s)"
          + (f"; {len(unchanged)} unchanged, not listed (e.g. {unchanged[0]})" if unchanged else ""))
    if rows:
        print(format_table(header, rows))
    if changed:
        summary = []
        for e in energies:
            ranks = sorted(s.ranks[e] for s in changed)
            summary.append(f"{100 * e:g}%: median {ranks[len(ranks) // 2]}, max {ranks[-1]}")
        print("rank keeping " + "; ".join(summary))
    if args.plot:
        from lorakit.plots import plot_delta_spectra

        print(f"figure: {plot_delta_spectra(spectra, args.plot)}")
    return 0
