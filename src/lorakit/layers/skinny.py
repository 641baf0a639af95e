"""The rank-r products of a LoRA layer, each computed in the orientation a CPU GEMM runs fast.

A product whose output has only r (= 8, say) columns, such as ``z = x·Aᵀ : (N, r)``, runs
3–5× slower in torch's CPU GEMM than the same numbers computed as its transpose, an output of
r *rows* (``(A·xᵀ)ᵀ``): measured on one thread, fp32, N = 512 tokens, rank 8, a 576→1536 layer
(BENCHMARKS.md, "The rank-r products"): ``g·B`` 758 µs against 200 µs as ``(Bᵀ·gᵀ)ᵀ``,
``gᵀ·z`` 1,406 µs against 246 µs as ``(zᵀ·g)ᵀ``, ``x·Aᵀ`` 123 µs against 85 µs. The results
are transposed views (``(N, r)`` with strides ``(1, N)``); every later product reads them as
they are, and ``z.t()`` / ``g_z.t()`` are the contiguous ``(r, N)`` the backward wants.

Shapes: ``x: (N, in)``, ``A: (r, in)``, ``B: (out, r)``, ``g: (N, out)``, ``z: (N, r)``.
"""

from __future__ import annotations

import torch

__all__ = ["down", "grad_down", "grad_up"]


def down(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``z = x·Aᵀ : (N, r)``, computed as ``(A·xᵀ)ᵀ``."""
    return torch.mm(A, x.t()).t()


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale·a·b``, the scale applied inside the GEMM (one kernel, not a GEMM and a multiply),
    into ``out`` when given."""
    if out is None:
        if scale == 1:
            return torch.mm(a, b)
        out = a.new_empty(a.shape[0], b.shape[1])
    return out.addmm_(a, b, beta=0, alpha=scale)  # beta=0: out's old contents are not read


def grad_down(g: torch.Tensor, B: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``g_z = s·g·B : (N, r)`` (the gradient reaching ``z``), computed as ``(s·Bᵀ·gᵀ)ᵀ``; written
    into ``out`` (``(r, N)``, contiguous, e.g. rows of a bigger buffer) when given."""
    return _scaled_mm(B.t(), g.t(), scale, out).t()


def grad_up(g: torch.Tensor, z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``∂B = s·gᵀ·z : (out, r)``, computed as ``(s·zᵀ·g)ᵀ``."""
    return _scaled_mm(z.t(), g, scale).t()
