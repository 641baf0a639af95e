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


def grad_down(g: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``g_z = g·B : (N, r)`` (the gradient reaching ``z``), computed as ``(Bᵀ·gᵀ)ᵀ``."""
    return torch.mm(B.t(), g.t()).t()


def grad_up(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``∂B = gᵀ·z : (out, r)``, computed as ``(zᵀ·g)ᵀ``."""
    return torch.mm(z.t(), g).t()
