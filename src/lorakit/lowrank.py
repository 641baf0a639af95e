"""Low-rank matrices: rank, SVD, the rank-r factorisation A ≈ B·Cᵀ, its error and cost.

Pure tensor math (seeds 000, 001, 004); imports nothing of lorakit but its error type.

Every function takes a 2-D matrix ``A: (m, n)`` as a torch tensor (float32 or
float64, on any device: the work runs where the tensor lives), a numpy array or a
nested list, and hands back tensors for a tensor and numpy arrays otherwise. Integer
input is computed in float64; float16/bfloat16 tensors are computed (and returned) in
float32, since LAPACK has no half-precision SVD. Bad input (not 2-D, empty, NaN/Inf,
rank out of range) raises :class:`~lorakit.errors.LorakitError` naming the value.

Factor shapes: ``U: (m, r)``, ``S: (r,)``, ``Vh: (r, n)``, ``B: (m, r)``, ``C: (n, r)``,
``A ≈ U @ diag(S) @ Vh = B @ C.T``.

Sign convention: singular vectors are defined only up to sign, and LAPACK, cuSOLVER
and the randomized SVD may each pick another. Every SVD here flips each pair
(u_i, v_i) so that the largest-magnitude entry of v_i is positive, which reproduces
the U and V printed in seed 000.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from lorakit.errors import LorakitError

__all__ = [
    "ApproximationError",
    "Storage",
    "approximation_error",
    "as_matrix",
    "check_rank",
    "choose_rank",
    "factorize",
    "factors_from_svd",
    "numerical_rank",
    "principal_angles",
    "randomized_svd",
    "singular_values",
    "storage",
    "truncated_svd",
]

# How the r singular values are shared between B and C: (power on B, power on C).
SPLITS = {
    "sqrt": (0.5, 0.5),  # B = U_r Σ_r^½, C = V_r Σ_r^½: balanced norms, as PiSSA starts LoRA
    "left": (1.0, 0.0),  # B = U_r Σ_r, C = V_r: seed 003's decoder U_r Σ_r and encoder V_r
    "right": (0.0, 1.0),  # B = U_r, C = V_r Σ_r: seed 000's orthonormal B
}


class ApproximationError(NamedTuple):
    """Error of a rank-r approximation A_r of A, beside the Eckart–Young bounds.

    Eckart–Young–Mirsky: no matrix of rank ≤ r is closer to A than the truncated SVD,
    whose error is sqrt(σ_{r+1}² + … + σ_p²) in Frobenius norm and σ_{r+1} in spectral
    norm (σ sorted descending, p = min(m, n); both 0 when r = p).
    """

    rank: int
    frobenius: float  # ‖A − A_r‖_F
    spectral: float  # ‖A − A_r‖_2
    frobenius_bound: float  # sqrt(Σ_{i>r} σ_i²)
    spectral_bound: float  # σ_{r+1}
    norm: float  # ‖A‖_F, to read the error relative to A

    @property
    def relative(self) -> float:
        """‖A − A_r‖_F / ‖A‖_F (0 for a zero matrix)."""
        return self.frobenius / self.norm if self.norm > 0 else 0.0

    @property
    def energy(self) -> float:
        """Fraction of ‖A‖_F² = Σσ² that the best rank-r approximation keeps (1 for a zero A)."""
        return 1.0 - (self.frobenius_bound / self.norm) ** 2 if self.norm > 0 else 1.0


class Storage(NamedTuple):
    """Elements needed to store an (m, n) matrix whole or as B: (m, r) and Cᵀ: (r, n)."""

    m: int
    n: int
    rank: int
    full: int  # m·n
    factored: int  # r·(m + n)

    @property
    def saved(self) -> float:
        """Fraction of the full storage saved by the factorisation (negative: it costs more)."""
        return 1.0 - self.factored / self.full

    @property
    def saved_percent(self) -> float:
        return 100.0 * self.saved


# ---------------------------------------------------------------- input checking


def as_matrix(A, name: str = "A") -> torch.Tensor:
    """Validate ``A`` (tensor, numpy array or nested list) and return a floating tensor ``(m, n)``.

    Tensors stay on their device and are not copied when already float32/float64.

    Raises:
        LorakitError: ``A`` is not 2-D, is empty, or holds NaN or Inf.
    """
    if isinstance(A, torch.Tensor):
        t = A.detach()
    else:
        try:
            arr = np.asarray(A)
        except (TypeError, ValueError) as err:
            raise LorakitError(f"{name} is not a numeric matrix ({err})") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise LorakitError(f"{name} has dtype {arr.dtype}; give a numeric matrix")
        if np.iscomplexobj(arr):
            raise LorakitError(f"{name} is complex; lorakit works on real matrices")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise LorakitError(f"{name} is complex; lorakit works on real matrices")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    if t.ndim != 2:
        raise LorakitError(
            f"{name} has {t.ndim} dimension(s) with shape {tuple(t.shape)}; give a 2-D matrix (m, n)"
        )
    if t.numel() == 0:
        raise LorakitError(f"{name} is empty (shape {tuple(t.shape)}); give a matrix with at least one entry")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i, j = (int(k) for k in bad.nonzero()[0])
        raise LorakitError(
            f"{name} holds {int(bad.sum())} NaN/Inf value(s), the first {float(t[i, j])} at row {i}, column {j}; "
            "clean or drop them first"
        )
    return t


def check_rank(r, m: int, n: int, name: str = "rank") -> int:
    """Return ``r`` as an int if 1 ≤ r ≤ min(m, n), else raise LorakitError naming it."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise LorakitError(f"{name} must be an integer, got {r!r}")
    r = int(r)
    if not 1 <= r <= min(m, n):
        raise LorakitError(f"{name} {r} is out of range for a {m}×{n} matrix; choose 1 ≤ {name} ≤ {min(m, n)}")
    return r


def _like(t: torch.Tensor, original):
    """Return ``t`` in the kind ``original`` came in: numpy for numpy, tensor otherwise."""
    return t.cpu().numpy() if not isinstance(original, torch.Tensor) else t


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each (u_i, v_i) so that the largest-|·| entry of v_i is positive (see module doc)."""
    idx = Vh.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(Vh.gather(1, idx)).squeeze(1)
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


# ---------------------------------------------------------------- rank and SVD


def singular_values(A):
    """All ``min(m, n)`` singular values of ``A: (m, n)``, descending (seed 000's Σ diagonal)."""
    return _like(torch.linalg.svdvals(as_matrix(A)), A)


def numerical_rank(A, tol: float | None = None) -> int:
    """Number of singular values of ``A: (m, n)`` above ``tol`` (seed 001: rank = non-zero σ).

    ``tol`` defaults to numpy's ``matrix_rank`` choice, σ_max · max(m, n) · eps, with eps
    the machine epsilon of A's dtype (float32 data is judged by float32 rounding).
    """
    t = as_matrix(A)
    s = torch.linalg.svdvals(t)
    if tol is None:
        tol = float(s.max()) * max(t.shape) * torch.finfo(t.dtype).eps
    elif not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise LorakitError(f"tol must be a finite number ≥ 0, got {tol!r}")
    return int((s > tol).sum())


def truncated_svd(A, r: int):
    """The r leading singular triplets of ``A: (m, n)``.

    Returns:
        ``(U, S, Vh)`` with ``U: (m, r)`` orthonormal columns, ``S: (r,)`` descending,
        ``Vh: (r, n)`` orthonormal rows, so that ``A_r = U @ diag(S) @ Vh`` (seed 000).

    Raises:
        LorakitError: bad matrix, or r < 1 or r > min(m, n).
    """
    t = as_matrix(A)
    r = check_rank(r, *t.shape)
    U, S, Vh = torch.linalg.svd(t, full_matrices=False)
    U, Vh = _fix_signs(U[:, :r], Vh[:r])
    return _like(U, A), _like(S[:r], A), _like(Vh, A)


def randomized_svd(A, r: int, oversample: int = 10, power_iters: int = 4, seed: int = 0):
    """Approximate r leading singular triplets of ``A: (m, n)`` by random projection.

    Halko, Martinsson & Tropp (2011), Algorithm 4.4 (randomized subspace iteration):
    sketch Y = A·Ω with a Gaussian Ω: (n, r + oversample), then ``power_iters`` rounds of
    Y ← A·(Aᵀ·Q), re-orthonormalising by QR after every product so that small singular
    directions are not lost to rounding; finally an exact SVD of the small Qᵀ·A.
    Costs O(m·n·(r + oversample)·(2·power_iters + 2)) instead of O(m·n·min(m, n)).
    Power iterations sharpen a slowly decaying spectrum (error ∝ (σ_{k+1}/σ_r)^(2q+1)).

    Returns:
        ``(U, S, Vh)`` shaped as :func:`truncated_svd`'s. Deterministic for a given ``seed``
        on a given device.
    """
    t = as_matrix(A)
    m, n = t.shape
    r = check_rank(r, m, n)
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise LorakitError(f"oversample must be an integer ≥ 0, got {oversample!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise LorakitError(f"power_iters must be an integer ≥ 0, got {power_iters!r}")
    k = min(r + oversample, m, n)
    gen = torch.Generator(device=t.device).manual_seed(int(seed))
    omega = torch.randn(n, k, generator=gen, device=t.device, dtype=t.dtype)
    Q, _ = torch.linalg.qr(t @ omega)  # (m, k): a basis for A's dominant range
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(t.T @ Q)  # (n, k)
        Q, _ = torch.linalg.qr(t @ Z)  # (m, k)
    Ub, S, Vh = torch.linalg.svd(Q.T @ t, full_matrices=False)  # (k, n) is small
    U, Vh = _fix_signs((Q @ Ub)[:, :r], Vh[:r])
    return _like(U, A), _like(S[:r], A), _like(Vh, A)


# ---------------------------------------------------------------- factorisation


def factors_from_svd(U, S, Vh, split: str = "sqrt"):
    """Turn an SVD ``(U: (m, r), S: (r,), Vh: (r, n))`` into ``B: (m, r)``, ``C: (n, r)``, B·Cᵀ = U·diag(S)·Vh.

    ``split`` says where the singular values go: ``"sqrt"`` (default) B = U·Σ^½, C = V·Σ^½;
    ``"left"`` B = U·Σ, C = V; ``"right"`` B = U, C = V·Σ (seed 000's B is U_r).
    """
    if split not in SPLITS:
        raise LorakitError(f"split {split!r} is not one of {sorted(SPLITS)}")
    pb, pc = SPLITS[split]
    if isinstance(U, np.ndarray):
        return U * S**pb, Vh.T * S**pc
    return U * S.pow(pb), Vh.T * S.pow(pc)


def factorize(A, r: int, split: str = "sqrt"):
    """The best rank-r factorisation ``A ≈ B @ C.T`` (seed 000: A_{m×n} = B_{m×r} C^T_{r×n}).

    Args:
        A: ``(m, n)`` matrix.
        r: target rank, 1 ≤ r ≤ min(m, n).
        split: how Σ_r is shared, see :func:`factors_from_svd`; default B = U_r Σ_r^½, C = V_r Σ_r^½.

    Returns:
        ``(B, C)`` with ``B: (m, r)``, ``C: (n, r)``; ``B @ C.T`` is the truncated SVD, so its
        error equals the Eckart–Young bound (:func:`approximation_error`).
    """
    U, S, Vh = truncated_svd(A, r)
    return factors_from_svd(U, S, Vh, split)


def approximation_error(A, r: int, approx=None) -> ApproximationError:
    """Errors of a rank-r approximation of ``A: (m, n)`` and the Eckart–Young bounds.

    Args:
        A: ``(m, n)`` matrix.
        r: the rank the bounds are for.
        approx: an ``(m, n)`` approximation of rank ≤ r (e.g. ``B @ C.T`` from any method);
            default the truncated SVD, whose errors equal the bounds up to rounding.

    Costs two full SVDs (of A for the bounds, of the residual for its spectral norm).
    """
    t = as_matrix(A)
    r = check_rank(r, *t.shape)
    U, S, Vh = torch.linalg.svd(t, full_matrices=False)
    if approx is None:
        approx_t = (U[:, :r] * S[:r]) @ Vh[:r]
    else:
        approx_t = as_matrix(approx, "approx").to(device=t.device, dtype=t.dtype)
        if approx_t.shape != t.shape:
            raise LorakitError(f"approx has shape {tuple(approx_t.shape)} but A has {tuple(t.shape)}")
    residual = t - approx_t
    tail = S[r:].double()
    return ApproximationError(
        rank=r,
        frobenius=float(torch.linalg.matrix_norm(residual, "fro")),
        spectral=float(torch.linalg.matrix_norm(residual, 2)),
        frobenius_bound=float(tail.square().sum().sqrt()),
        spectral_bound=float(tail[0]) if tail.numel() else 0.0,
        norm=float(S.double().square().sum().sqrt()),
    )


def storage(m: int, n: int, r: int) -> Storage:
    """Elements to store an (m, n) matrix whole (m·n) or as B, Cᵀ (r·(m + n)); seeds 000 and 004.

    ``storage(5000, 100, 20)`` → 500,000 vs 102,000 elements, 79.6% saved.
    """
    for name, value in (("m", m), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise LorakitError(f"{name} must be a positive integer, got {value!r}")
    m, n = int(m), int(n)
    r = check_rank(r, m, n)
    return Storage(m=m, n=n, rank=r, full=m * n, factored=r * (m + n))


def choose_rank(A_or_sigma, energy: float = 0.95) -> int:
    """Smallest r whose r leading singular values hold ``energy`` of Σσ² (the squared Frobenius norm).

    Args:
        A_or_sigma: an ``(m, n)`` matrix, or its singular values ``(p,)`` in any order.
        energy: fraction in (0, 1]; 1 keeps every non-zero σ.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise LorakitError(f"energy must be a fraction in (0, 1], got {energy!r}")
    values = A_or_sigma if isinstance(A_or_sigma, torch.Tensor) else np.asarray(A_or_sigma)
    if values.ndim == 1:
        s = as_matrix(values[None, :], "sigma")[0]
        if bool((s < 0).any()):
            raise LorakitError(f"singular values must be ≥ 0; got {float(s.min())}")
        s = s.sort(descending=True).values
    else:
        s = torch.linalg.svdvals(as_matrix(values))
    power = s.double().square().cumsum(0)
    if float(power[-1]) == 0.0:
        raise LorakitError("the matrix is all zeros, so no rank holds any energy; nothing to approximate")
    fraction = power / power[-1]
    return min(int((fraction < energy).sum()) + 1, s.numel())


# ---------------------------------------------------------------- subspaces


def principal_angles(U1, U2):
    """Principal angles (radians, ascending) between the column spaces of ``U1: (m, p)`` and ``U2: (m, q)``.

    The columns need not be orthonormal; each basis is orthonormalised by QR first. The
    cosines are the singular values of Q1ᵀ·Q2 (Björck & Golub, 1973), computed in float64:
    angles below ~1e-7 rad read as 0. Returns ``min(p, q)`` angles in [0, π/2].
    """
    a = as_matrix(U1, "U1").double()
    b = as_matrix(U2, "U2").double().to(a.device)
    if a.shape[0] != b.shape[0]:
        raise LorakitError(f"U1 has {a.shape[0]} rows but U2 has {b.shape[0]}; both bases must live in the same space")
    q1, _ = torch.linalg.qr(a)
    q2, _ = torch.linalg.qr(b)
    cos = torch.linalg.svdvals(q1.T @ q2).clamp(0.0, 1.0)
    angles = torch.arccos(cos).sort().values
    return _like(angles, U1)
