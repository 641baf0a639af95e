"""Randomized SVD vs full ``torch.linalg.svd`` on a matrix with a known, decaying spectrum.

The matrix is A = U·diag(σ)·Vᵀ with random orthogonal U, V and σ_i = 1/i, so the
Eckart–Young bound of the best rank-r approximation, sqrt(Σ_{i>r} σ_i²), is known
exactly. Full SVD and randomized SVD alternate (interleaved repetitions, so drift in
machine load hits both alike) and the medians are compared.

Goal (issue 2): 4096×4096 float32 at rank 64, randomized ≥ 10× faster than full SVD
on CPU, Frobenius error within 1% of the bound. ``python -m benchmarks.svd [--quick]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from lorakit.lowrank import randomized_svd

FULL = dict(n=4096, rank=64, reps=5)
QUICK = dict(n=256, rank=16, reps=1)
OVERSAMPLE = 10
POWER_ITERS = 4


def decaying_matrix(n: int, device: str, dtype=torch.float32, seed: int = 0):
    """``A: (n, n) = U·diag(σ)·Vᵀ`` with σ_i = 1/i; returns ``(A, σ)``, σ in float64."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    sigma = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    A = (U * sigma.to(dtype)) @ V.T
    return A.to(device), sigma


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _error(A, U, S, Vh) -> float:
    """‖A − U·diag(S)·Vh‖_F, in float64."""
    return float(torch.linalg.matrix_norm((A - (U * S) @ Vh).double(), "fro"))


def run(quick: bool = False, device: str | None = None) -> dict:
    """Time both SVDs and measure the randomized one's error against the Eckart–Young bound.

    Returns a dict of figures: seconds (medians), speedup, errors and their ratio to the bound.
    """
    size = QUICK if quick else FULL
    n, r, reps = size["n"], size["rank"], size["reps"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    A, sigma = decaying_matrix(n, device)
    bound = float(sigma[r:].square().sum().sqrt())

    randomized_svd(A[:256, :256], 8)  # warm up the kernels once, not the full SVD's minutes
    full_times, rand_times = [], []
    for _ in range(reps):
        t_full, (Uf, Sf, Vhf) = _timed(lambda: torch.linalg.svd(A, full_matrices=False), device)
        t_rand, (U, S, Vh) = _timed(lambda: randomized_svd(A, r, OVERSAMPLE, POWER_ITERS), device)
        full_times.append(t_full)
        rand_times.append(t_rand)

    full_s, rand_s = statistics.median(full_times), statistics.median(rand_times)
    rand_error = _error(A, U, S, Vh)
    full_error = _error(A, Uf[:, :r], Sf[:r], Vhf[:r])
    return {
        "matrix": f"{n}x{n} float32, sigma_i = 1/i",
        "rank": r,
        "oversample": OVERSAMPLE,
        "power_iters": POWER_ITERS,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "reps": reps,
        "full_svd_s": round(full_s, 6),
        "randomized_svd_s": round(rand_s, 6),
        "full_svd_all_s": [round(t, 6) for t in full_times],
        "randomized_svd_all_s": [round(t, 6) for t in rand_times],
        "speedup": round(full_s / rand_s, 2),
        "eckart_young_bound": bound,
        "randomized_error": rand_error,
        "randomized_error_over_bound": rand_error / bound,
        "full_svd_error_over_bound": full_error / bound,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
