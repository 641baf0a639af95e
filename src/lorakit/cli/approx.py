"""`lorakit approx` and `lorakit rank`: low-rank approximation of one matrix (seeds 000, 001, 004).

Parsing and printing only: the numbers come from :mod:`lorakit.lowrank`, the matrix
from :func:`lorakit.matrixio.load_matrix`, the figure from :func:`lorakit.plots.plot_spectrum`.
Those imports happen inside the commands so that ``lorakit --help`` does not load torch.
"""

from __future__ import annotations

import argparse

# Seed 000's worked example and the figures it (and seed 004) quotes.
EXAMPLE = [[3.0, 2.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]
EXAMPLE_RANK = 2
EXAMPLE_SEED_APPROX = "[[2.99, 2.01, 0.98], [0.02, 1.88, 1.1], [-0.07, 0.45, 0.29]]"
EXAMPLE_STORAGE = [(5000, 100, 20, "seed 000"), (5000, 100, 10, "seed 000"), (512, 64, 8, "seed 004")]

# Matrices with no side longer than this are printed in full.
SMALL = 10
# At most this many singular values are listed.
MAX_SIGMAS = 20

SPLIT_NAMES = {"sqrt": ("U_r Σ_r^½", "Σ_r^½ V_rᵀ"), "left": ("U_r Σ_r", "V_rᵀ"), "right": ("U_r", "Σ_r V_rᵀ")}


def register(subparsers) -> None:
    approx = subparsers.add_parser(
        "approx",
        help="rank-r approximation A ≈ B·Cᵀ of a matrix by SVD: error and storage",
        description=(
            "Approximate a matrix by a rank-R product B·Cᵀ (truncated SVD) and print the singular "
            "values, the factors when small, the approximation, its error beside the Eckart–Young "
            "bound, and the storage saved. Without --rank or --energy, R keeps 95% of the energy."
        ),
    )
    approx.add_argument("file", nargs="?", help="matrix file: .npy, .npz, .csv/.txt/.tsv, or .safetensors")
    approx.add_argument("--key", help="array name inside a .npz or .safetensors file")
    pick = approx.add_mutually_exclusive_group()
    pick.add_argument("--rank", "-r", type=int, metavar="R", help="target rank, 1 ≤ R ≤ min(m, n)")
    pick.add_argument(
        "--energy", type=float, metavar="E", help="pick the smallest R keeping this fraction of Σσ² (e.g. 0.95)"
    )
    approx.add_argument(
        "--split",
        default=None,
        help="where Σ goes: sqrt (B=UΣ^½, C=VΣ^½; the default), left (B=UΣ), right (B=U, as seed 000 and --example)",
    )
    approx.add_argument("--plot", metavar="OUT.png", help="also draw the spectrum with its cumulative energy")
    approx.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    approx.add_argument("--digits", type=int, default=None, help="decimals printed (default 4; 2 for --example)")
    approx.add_argument("--example", action="store_true", help="walk through seed 000's worked example")
    approx.set_defaults(func=run_approx)

    rank = subparsers.add_parser(
        "rank",
        help="numerical rank of a matrix",
        description="Count the singular values above tol (default numpy's: σ_max·max(m, n)·eps).",
    )
    rank.add_argument("file", help="matrix file: .npy, .npz, .csv/.txt/.tsv, or .safetensors")
    rank.add_argument("--key", help="array name inside a .npz or .safetensors file")
    rank.add_argument("--tol", type=float, help="singular values at or below this count as zero")
    rank.set_defaults(func=run_rank)


def run_approx(args: argparse.Namespace) -> int:
    from lorakit import lowrank
    from lorakit.errors import LorakitError
    from lorakit.matrixio import load_matrix
    from lorakit.plots import check_figure_path, plot_spectrum

    digits = args.digits if args.digits is not None else (2 if args.example else 4)
    if digits < 0:
        raise LorakitError(f"--digits must be ≥ 0, got {digits}")
    if args.plot:
        check_figure_path(args.plot, args.overwrite)  # a bad name fails now, not after the report
    if args.split is not None and args.split not in lowrank.SPLITS:
        raise LorakitError(f"--split {args.split!r} is not one of {', '.join(lowrank.SPLITS)}")
    if args.example:
        if args.file is not None:
            raise LorakitError(f"--example takes no FILE (got {args.file!r}); drop one of them")
        split = args.split or "right"
        A = lowrank.as_matrix(EXAMPLE)
        r = EXAMPLE_RANK if args.rank is None and args.energy is None else _pick_rank(args, A)
        _print_example_intro(A, r, digits)
        label = "seed 000's A"
    else:
        if args.file is None:
            raise LorakitError("give a matrix FILE (.npy, .npz, .csv, .txt, .safetensors) or --example")
        split = args.split or "sqrt"
        A = load_matrix(args.file, key=args.key)
        m, n = A.shape
        print(f"A: {m}×{n} {str(A.dtype).removeprefix('torch.')} from {args.file}"
              + (f" [{args.key}]" if args.key else ""))
        r = _pick_rank(args, A)
        label = args.file
    sigma = _report(A, r, split, digits, show_svd=not args.example)
    if args.example and r == EXAMPLE_RANK:
        print(f"\nseed 000 prints A_2 ≈ {EXAMPLE_SEED_APPROX};")
        print("it multiplied factors rounded to two decimals, and its 1.1 is 1.19 unrounded.")
    if args.example:
        print("\nstorage at scale (elements of A vs B and Cᵀ):")
        print(_storage_table([lowrank.storage(m, n, k) for m, n, k, _ in EXAMPLE_STORAGE],
                             [note for *_, note in EXAMPLE_STORAGE]))
    if args.plot:
        written = plot_spectrum(sigma, args.plot, title=f"Singular values of {label}", rank=r)
        print(f"\nspectrum written to {written}")
    return 0


def run_rank(args: argparse.Namespace) -> int:
    from lorakit import lowrank
    from lorakit.matrixio import load_matrix

    A = load_matrix(args.file, key=args.key)
    m, n = A.shape
    r = lowrank.numerical_rank(A, tol=args.tol)
    print(f"numerical rank: {r}")
    sigma = lowrank.singular_values(A)
    print(f"{m}×{n} matrix, full rank would be {min(m, n)}; singular values: {_list(sigma, 4)}")
    return 0


# ---------------------------------------------------------------- printing


def _pick_rank(args, A) -> int:
    from lorakit import lowrank

    if args.rank is not None:
        return lowrank.check_rank(args.rank, *A.shape)
    energy = 0.95 if args.energy is None else args.energy
    r = lowrank.choose_rank(A, energy=energy)
    print(f"rank {r} chosen: the smallest keeping ≥ {100 * energy:g}% of the energy Σσ²")
    return r


def _print_example_intro(A, r: int, digits: int) -> None:
    from lorakit import lowrank

    m, n = A.shape
    p = min(m, n)
    U, S, Vh = lowrank.truncated_svd(A, p)
    print("Seed 000's worked example: approximate a matrix by a product of two thinner ones.\n")
    print(f"A ({m}×{n}), numerical rank {lowrank.numerical_rank(A)}:")
    print(_matrix(A, 0))
    print("\nSVD, A = U Σ Vᵀ:")
    print("U =")
    print(_matrix(U, digits))
    print(f"Σ = diag({_list(S, digits)})")
    print("V =")
    print(_matrix(Vh.T, digits))
    print(f"\nkeep the {r} largest singular values: A ≈ U_r Σ_r V_rᵀ = B Cᵀ with r = {r}")


def _report(A, r: int, split: str, digits: int, show_svd: bool = True):
    """Print singular values, factors, approximation, error and storage; return all σ."""
    from lorakit import lowrank

    m, n = A.shape
    sigma = lowrank.singular_values(A)
    B, C = lowrank.factorize(A, r, split=split)
    if show_svd:
        print(f"singular values ({sigma.numel()}): {_list(sigma, digits)}")
    b_name, ct_name = SPLIT_NAMES.get(split, ("B", "Cᵀ"))
    if max(m, r) <= SMALL and max(r, n) <= SMALL:
        print(f"\nB = {b_name} ({m}×{r}):")
        print(_matrix(B, digits))
        print(f"Cᵀ = {ct_name} ({r}×{n}):")
        print(_matrix(C.T, digits))
    else:
        print(f"\nB: {m}×{r} and Cᵀ: {r}×{n} (not printed: larger than {SMALL}×{SMALL})")
    approx = B @ C.T
    if max(m, n) <= SMALL:
        print(f"\nrank-{r} approximation A_{r} = B Cᵀ:")
        print(_matrix(approx, digits))
    err = lowrank.approximation_error(A, r, approx=approx)
    print(f"\nrank {r} keeps {100 * err.energy:.1f}% of the energy Σσ²")
    w = max(digits + 8, 12)
    print(f"  {'error of A_' + str(r):<12}{'measured':>{w}}  {'Eckart–Young bound':>{w + 6}}")
    print(f"  {'Frobenius':<12}{err.frobenius:>{w}.{digits}f}  {err.frobenius_bound:>{w + 6}.{digits}f}"
          f"   = sqrt(Σ_{{i>{r}}} σ_i²), {100 * err.relative:.1f}% of ‖A‖_F")
    why = f"= σ_{r + 1}" if r < min(m, n) else "(full rank: exact)"
    print(f"  {'spectral':<12}{err.spectral:>{w}.{digits}f}  {err.spectral_bound:>{w + 6}.{digits}f}   {why}")
    print("\nstorage (elements):")
    cost = lowrank.storage(m, n, r)
    print(_storage_table([cost]))
    if cost.saved < 0:
        print("  (B and Cᵀ hold more than A here: factoring pays off when r·(m+n) < m·n, i.e. r ≪ min(m, n))")
    return sigma


def _storage_table(rows, notes=None) -> str:
    lines = [f"  {'matrix':>12} {'rank':>5} {'full m·n':>12} {'B,Cᵀ r·(m+n)':>14} {'saved':>8}"]
    for i, s in enumerate(rows):
        note = f"  ({notes[i]})" if notes else ""
        lines.append(f"  {f'{s.m}×{s.n}':>12} {s.rank:>5} {s.full:>12,} {s.factored:>14,} {s.saved_percent:>7.1f}%{note}")
    return "\n".join(lines)


def _matrix(M, digits: int) -> str:
    rows = [[f"{float(x):.{digits}f}" for x in row] for row in M.tolist()]
    rows = [[c.removeprefix("-") if float(c) == 0 else c for c in row] for row in rows]  # no "-0.00"
    width = max(len(c) for row in rows for c in row)
    return "\n".join("  " + " ".join(c.rjust(width) for c in row) for row in rows)


def _list(values, digits: int) -> str:
    vals = [f"{float(x):.{digits}f}" for x in values[:MAX_SIGMAS]]
    more = f" … ({len(values) - MAX_SIGMAS} more)" if len(values) > MAX_SIGMAS else ""
    return ", ".join(vals) + more
