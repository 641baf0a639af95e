"""Normalized subspace similarity φ between two adapters' learned directions.

LoRA paper §7.2, Eq. (4) (seed 002, "What is the optimal rank for ΔW"): take the SVD
of two adapters' ``A`` matrices (``A: (r, in)``), keep their right-singular vectors
(the directions in input space A reads from), and measure how much of the top-i
directions of one lie in the top-j directions of the other::

    φ(A1, A2, i, j) = ‖U_iᵀ U_j‖_F² / min(i, j)   ∈ [0, 1]

with ``U_i: (in, i)`` the first i right-singular vectors of A1 and ``U_j: (in, j)``
those of A2. φ = 1 when one subspace contains the other, 0 when they are orthogonal.
Two random subspaces of dimensions i and j in ``R^in`` give ``max(i, j) / in`` on
average (the expected ‖U_iᵀU_j‖_F² is i·j/in), the baseline to read φ against.

The paper found φ(1, 1) > 0.5 between r = 8 and r = 64 adapters of GPT-3 and small φ
beyond the top few directions; :func:`subspace_similarity` computes the whole
``(r1, r2)`` map in one SVD per matrix and a cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError
from lorakit.lowrank import as_matrix

__all__ = ["ModuleSimilarity", "adapter_similarity", "compare_adapters", "random_baseline", "subspace_similarity"]

FACTORS = ("A", "B", "delta")


def _row_space_basis(M: torch.Tensor) -> torch.Tensor:
    """Right-singular vectors of ``M: (r, n)`` as rows ``(k, n)``, k = min(r, n), by descending σ."""
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return Vh


def subspace_similarity(A1, A2) -> torch.Tensor:
    """φ(i, j) for every i ≤ r1, j ≤ r2 between the row spaces of ``A1`` and ``A2``.

    Args:
        A1: ``(r1, n)``, e.g. a LoRA ``A`` of rank r1 (rows live in input space ``R^n``).
        A2: ``(r2, n)``, the same ``n``.

    Returns:
        ``phi: (k1, k2)`` float64 with k = min(r, n), ``phi[i-1, j-1] = φ(i, j)`` as in
        LoRA Eq. (4). For a ``B: (out, r)`` pass ``B.T`` (its left-singular vectors).

    Raises:
        LorakitError: a matrix is not 2-D or is not finite, or the widths ``n`` differ.
    """
    a = as_matrix(A1, "A1").double()
    b = as_matrix(A2, "A2").double().to(a.device)
    if a.shape[1] != b.shape[1]:
        raise LorakitError(
            f"A1 is {tuple(a.shape)} and A2 is {tuple(b.shape)}: their rows must live in the same space "
            "(same number of columns); compare adapters of the same module"
        )
    overlap = (_row_space_basis(a) @ _row_space_basis(b).T).square()  # (k1, k2): cos² between directions
    captured = overlap.cumsum(0).cumsum(1)  # ‖U_iᵀ U_j‖_F² for every (i, j)
    i = torch.arange(1, captured.shape[0] + 1, dtype=torch.float64, device=a.device)[:, None]
    j = torch.arange(1, captured.shape[1] + 1, dtype=torch.float64, device=a.device)[None, :]
    return (captured / torch.minimum(i, j)).clamp(0.0, 1.0).cpu()


def _delta_rows(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(r, in)`` rows ``diag(σ_r) V_rᵀ`` of ``ΔW ∝ B·A``: its input directions, ordered by how much ΔW uses them."""
    _, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    r = A.shape[0]
    return S[:r, None] * Vh[:r]


def random_baseline(i: int, j: int, n: int) -> float:
    """Expected φ(i, j) between uniformly random subspaces of dimensions i and j in ``R^n``: max(i, j)/n."""
    return min(1.0, max(i, j) / n)


@dataclass
class ModuleSimilarity:
    """φ between two adapters at one module.

    Attributes:
        path: module path (e.g. ``bert.encoder.layer.0.attention.self.query``).
        phi: ``(k1, k2)`` float64, ``phi[i-1, j-1] = φ(i, j)``.
        dim: the dimension of the space the directions live in (``in`` for A, ``out`` for B).
    """

    path: str
    phi: torch.Tensor
    dim: int

    @property
    def ranks(self) -> tuple[int, int]:
        return tuple(self.phi.shape)

    @property
    def top(self) -> float:
        """φ(1, 1): do the two adapters' first directions agree?"""
        return float(self.phi[0, 0])

    @property
    def diagonal(self) -> torch.Tensor:
        """φ(k, k) for k = 1..min(k1, k2): overlap of equally sized leading subspaces."""
        k = min(self.phi.shape)
        return self.phi.diagonal()[:k]

    def baseline(self, i: int, j: int) -> float:
        return random_baseline(i, j, self.dim)


def adapter_similarity(factors_1: dict, factors_2: dict, module: str | None = None,
                       factor: str = "A") -> list[ModuleSimilarity]:
    """φ between two adapters, module by module (LoRA §7.2).

    Args:
        factors_1, factors_2: module path -> ``(A: (r, in), B: (out, r))``, as
            :func:`lorakit.analysis.weights.adapter_factors` reads them from a PEFT file.
        module: a regular expression; only paths it finds (``re.search``) are compared.
        factor: ``"A"`` (right-singular vectors of A, the paper's choice), ``"B"``
            (left-singular vectors of B), or ``"delta"`` (right-singular vectors of ΔW = B·A,
            ordered by ΔW's singular values: the input directions the update actually uses;
            A's own directions say little while A is still close to its random init, since
            its gradient is zero until B has grown).

    Returns:
        one :class:`ModuleSimilarity` per module both adapters hold, in the first's order.

    Raises:
        LorakitError: unknown ``factor``, a bad pattern, or no module in common.
    """
    if factor not in FACTORS:
        raise LorakitError(f"factor {factor!r} is not one of {list(FACTORS)}")
    from lorakit.analysis.weights import compile_pattern

    pattern = compile_pattern(module)
    common = [p for p in factors_1 if p in factors_2 and (pattern is None or pattern.search(p))]
    if not common:
        only = f" matching {module!r}" if module else ""
        raise LorakitError(
            f"the two adapters share no module{only}: the first has {sorted(factors_1)[:4]}..., "
            f"the second {sorted(factors_2)[:4]}...; compare adapters trained on the same targets"
        )
    results = []
    for path in common:
        (A1, B1), (A2, B2) = factors_1[path], factors_2[path]
        if factor == "A":
            m1, m2 = A1, A2
        elif factor == "B":
            m1, m2 = B1.T, B2.T
        else:
            m1, m2 = _delta_rows(A1, B1), _delta_rows(A2, B2)
        try:
            phi = subspace_similarity(m1, m2)
        except LorakitError as err:
            raise LorakitError(f"{path}: {err}") from None
        results.append(ModuleSimilarity(path=path, phi=phi, dim=int(m1.shape[1])))
    return results


def compare_adapters(adapter_1, adapter_2, module: str | None = None, factor: str = "A") -> list[ModuleSimilarity]:
    """:func:`adapter_similarity` between two adapter folders (PEFT format), e.g. r = 8 and r = 64."""
    from lorakit.analysis.weights import adapter_factors
    from lorakit.io import read_adapter

    factors = [_dense(config, adapter_factors(tensors), folder)
               for folder, (config, tensors) in ((a, read_adapter(a)) for a in (adapter_1, adapter_2))]
    return adapter_similarity(*factors, module=module, factor=factor)


def _dense(config, factors: dict, folder) -> dict:
    """``factors`` without the adapter's LoRA on parameters (fused experts, routers), which are left
    out with a warning: their A stacks every expert's rows, and telling the experts apart takes
    their count, which the file does not record (``analyze amplification`` has the model, and
    compares per expert)."""
    import warnings

    from lorakit.module_names import parameter_matches
    from lorakit.peft_format import parameter_host

    wanted = config.target_parameters or []
    on = [key for key in factors
          if any(parameter_matches(t, f"{parameter_host(key)}.{t.rsplit('.', 1)[-1]}") for t in wanted)]
    if on and len(on) == len(factors):
        raise LorakitError(f"{folder} holds LoRA on parameters only ({wanted}), whose stacked experts analyze "
                           "similarity does not compare; use analyze amplification, which reads them per expert")
    if on:
        warnings.warn(f"{folder}: left out {len(on)} LoRA on parameters ({', '.join(wanted)}): their experts are "
                      "stacked in one factor, compared per expert by analyze amplification only", stacklevel=2)
    return {key: value for key, value in factors.items() if key not in on}
