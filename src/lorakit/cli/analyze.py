"""`lorakit analyze similarity|amplification`: the LoRA paper's §7 analyses of trained adapters.

Parsing and printing only; the numbers come from :mod:`lorakit.analysis`, the figures
from :mod:`lorakit.plots`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse

from lorakit.cli.tables import format_table


def register(subparsers) -> None:
    analyze = subparsers.add_parser(
        "analyze",
        help="subspace similarity between adapters, amplification of W by ΔW (LoRA §7)",
        description="The LoRA paper's analyses of trained adapters (§7.2 and §7.3).",
    )
    verbs = analyze.add_subparsers(dest="analysis", metavar="<analysis>")

    sim = verbs.add_parser(
        "similarity",
        help="normalized subspace similarity φ(i, j) between two adapters, per module (Figure 3)",
        description=(
            "φ(i, j) = ‖U_iᵀ U_j‖_F² / min(i, j) between the top-i right-singular vectors of the first "
            "adapter's A and the top-j of the second's, per module (LoRA Eq. 4). 1: one subspace holds "
            "the other; 0: orthogonal; random subspaces give max(i, j)/n."
        ),
    )
    sim.add_argument("adapter_1", metavar="ADAPTER_1", help="adapter folder (PEFT format), e.g. trained at r=8")
    sim.add_argument("adapter_2", metavar="ADAPTER_2", help="adapter folder, e.g. trained at r=64")
    sim.add_argument("--module", metavar="PATTERN", help="regular expression selecting module paths")
    sim.add_argument("--factor", choices=("A", "B", "delta"), default="A",
                     help="compare A's right-singular vectors (default, as the paper), B's left ones, or the "
                          "right-singular vectors of ΔW = B·A (the input directions the update uses)")
    sim.add_argument("--plot", metavar="OUT.png", help="draw the φ heatmaps (one panel per module, up to 12)")
    sim.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    sim.set_defaults(func=run_similarity)

    amp = verbs.add_parser(
        "amplification",
        help="‖ΔW‖_F against ‖UᵀWV‖_F along ΔW's, W's and random directions (Table 7)",
        description=(
            "For each module: ‖ΔW‖_F, the projection ‖UᵀWV‖_F of the base weight onto ΔW's top-r singular "
            "directions, onto W's own top-r and onto random ones, and the amplification factor "
            "‖ΔW‖_F / ‖UᵀWV‖_F (LoRA §7.3; the paper found about 21.5 at r = 4)."
        ),
    )
    amp.add_argument("adapter", metavar="ADAPTER", help="adapter folder (PEFT format)")
    amp.add_argument("--base", required=True, metavar="MODEL",
                     help="the model the adapter was trained on: 'default', 'default-chat' or a folder")
    amp.add_argument("--rank", "-r", type=int, metavar="R", help="directions compared (default: the adapter's rank)")
    amp.add_argument("--module", metavar="PATTERN", help="regular expression selecting module paths")
    amp.add_argument("--seed", type=int, default=0, help="seed of the random baseline directions")
    amp.add_argument("--plot", metavar="OUT.png", help="draw the projections and factors per module")
    amp.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    amp.set_defaults(func=run_amplification)
    analyze.set_defaults(func=lambda args: _missing_analysis(analyze))


def _missing_analysis(parser) -> int:
    parser.print_help()
    return 2


def run_similarity(args: argparse.Namespace) -> int:
    from lorakit.analysis import compare_adapters
    from lorakit.plots import check_figure_path

    if args.plot:
        check_figure_path(args.plot, args.overwrite)  # before the work, not after it
    from lorakit.run_folder import adapter_folder  # a run folder of lorakit train stands for its adapter/

    results = compare_adapters(adapter_folder(args.adapter_1), adapter_folder(args.adapter_2), module=args.module,
                               factor=args.factor)
    rows = []
    for res in results:
        k1, k2 = res.ranks
        rows.append([res.path, k1, k2, f"{res.top:.3f}", f"{float(res.diagonal[-1]):.3f}",
                     f"{float(res.phi[0, -1]):.3f}", f"{float(res.phi[-1, -1]):.3f}",
                     f"{res.baseline(k1, k2):.3f}"])
    print(f"subspace similarity of {args.factor} (LoRA Eq. 4), {len(results)} module(s): "
          "φ(i, j) = ‖U_iᵀU_j‖_F² / min(i, j)")
    print(format_table(["module", "r1", "r2", "φ(1,1)", "φ(k,k)", "φ(1,r2)", "φ(r1,r2)", "random"], rows))
    print("k = min(r1, r2); random = max(r1, r2)/n, the φ(r1, r2) of random subspaces")
    if args.plot:
        from lorakit.plots import plot_similarity

        print(f"figure: {plot_similarity(results, args.plot)}")
    return 0


def run_amplification(args: argparse.Namespace) -> int:
    from lorakit.analysis import adapter_amplification
    from lorakit.plots import check_figure_path

    if args.plot:
        check_figure_path(args.plot, args.overwrite)  # before the work, not after it
    from lorakit.run_folder import adapter_folder

    results = adapter_amplification(adapter_folder(args.adapter), args.base, r=args.rank, module=args.module,
                                    seed=args.seed)
    rows = [[path, a.rank, f"{a.delta_norm:.4g}", f"{a.along_delta:.4g}", f"{a.along_weight:.4g}",
             f"{a.along_random:.4g}", f"{a.weight_norm:.4g}", f"{a.factor:.2f}"]
            for path, a in results.items()]
    print(f"amplification of W by ΔW (LoRA §7.3, Table 7), {len(results)} module(s); "
          "‖UᵀWV‖_F with U, V the top-r singular directions of:")
    print(format_table(["module", "r", "‖ΔW‖_F", "ΔW's", "W's", "random", "‖W‖_F", "factor"], rows))
    factors = sorted(a.factor for a in results.values())
    print(f"factor = ‖ΔW‖_F / ‖UᵀWV‖_F (ΔW's directions): median {factors[len(factors) // 2]:.2f}, "
          f"range {factors[0]:.2f}–{factors[-1]:.2f} (paper: ~21.5 at r = 4 for GPT-3 W_q)")
    if args.plot:
        from lorakit.plots import plot_amplification

        print(f"figure: {plot_amplification(results, args.plot)}")
    return 0
