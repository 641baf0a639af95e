"""AdaLoRA's layer kind: the update in SVD form, ``ΔW = s · P · diag(λ) · Q``.

Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(AdaLoRA, named in seed 003 as the way to choose r during training), §3.1:

- ``P: (out, r)`` and ``Q: (r, in)`` play the roles of the left/right singular vectors
  and start Gaussian; ``λ: (r,)`` plays the singular values and starts at 0, so ΔW = 0
  at step 0, as LoRA's B = 0;
- pruning a direction sets its ``λ_i`` to 0 (P and Q keep training, so it can come back
  while the budget still allows); see :mod:`lorakit.adalora.allocator`;
- the orthogonality regularizer ``R = ‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F²`` keeps P and Q close
  to orthonormal so that λ really ranks directions (§3.1, Eq. 4). It is added to the
  loss's *gradient* by hooks on P and Q (``γ · ∂R/∂P = 4γ · P(PᵀP − I)``, and
  ``4γ · (QQᵀ − I)Q``), so any training loop gets it without changing its loss.

The hooks also sum each parameter's gradient between allocator steps: the sensitivity
``|θ · ∂L/∂θ|`` the allocator scores directions by needs it after the optimizer has
cleared ``.grad``.

Seen as a LoRA adapter, ``A = Q`` and ``B = P·diag(λ)``: :class:`AdaLoraLinear` is a
:class:`~lorakit.layers.linear.LoraLinear` whose adapters are :class:`AdaLoraAdapter` s,
so its forward, merge, per-row stacks and saving are LoRA's own. A saved adapter keeps
only the live directions (λ ≠ 0), each module at its own rank: a plain LoRA file.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.layers.linear import LoraLinear

__all__ = ["AdaLoraAdapter", "AdaLoraLinear", "INIT_STD"]

#: standard deviation of P's and Q's Gaussian init
INIT_STD = 0.02


class AdaLoraAdapter(nn.Module):
    """One AdaLoRA adapter: ``P: (out, r)``, ``lam: (r,)``, ``Q: (r, in)``, and the buffer
    ``mask: (r,)``, 1 for directions the allocator keeps.

    ``scaling`` is ``s = alpha / r`` with the initial r (fixed while directions are
    pruned). As LoRA factors: ``A = Q : (r, in)``, ``B = P·diag(λ) : (out, r)``.

    Attributes:
        orth_weight: γ of the orthogonality regularizer (the paper uses 0.1).
        grad_scale: 1 / forward passes per optimizer step, so γ·∂R is added once per step.
        grad_sums: P's, λ's and Q's gradients summed since :meth:`pop_grad_sums`.
    """

    bias = None  # no bias on B (PEFT's lora_bias is LoRA's alone)

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, scaling: float,
                 dropout: float = 0.0, *, dtype=None, device=None):
        super().__init__()
        self.P = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.lam = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.Q = nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
        self.register_buffer("mask", torch.ones(r, dtype=dtype, device=device))
        self.r = r
        self.alpha = alpha
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.orth_weight = 0.1
        self.grad_scale = 1.0
        self.grad_sums: dict[str, torch.Tensor] = {}
        for name in ("P", "lam", "Q"):
            getattr(self, name).register_hook(self._make_hook(name))

    # ------------------------------------------------------------------ as LoRA factors

    @property
    def A(self) -> torch.Tensor:
        """``Q : (r, in)``."""
        return self.Q

    @property
    def B(self) -> torch.Tensor:
        """``P·diag(λ) : (out, r)`` (differentiable: gradients reach P and λ)."""
        return self.P * self.lam

    def delta(self) -> torch.Tensor:
        """``s · P diag(λ) Q : (out, in)`` fp32 (pruned directions have λ = 0)."""
        return (self.P.float() * self.lam.float()) @ self.Q.float() * self.scaling

    @torch.no_grad()
    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live directions K (mask = 1 and λ ≠ 0): ``A = Q_K : (k, in)``,
        ``B = P_K·diag(λ_K) : (out, k)``, so ``ΔW = scaling·B·A`` exactly as in the forward."""
        keep = (self.mask > 0) & (self.lam != 0)
        return self.Q[keep], self.P[:, keep] * self.lam[keep]

    def version(self) -> tuple:
        """Changes whenever P, λ, Q or the mask change (see :meth:`LoraAdapter.version`)."""
        return tuple((t.data_ptr(), t._version) for t in (self.P, self.lam, self.Q, self.mask)) + (self.scaling,)

    @property
    def rank(self) -> int:
        """Directions currently kept (mask = 1)."""
        return int(self.mask.sum())

    # ------------------------------------------------------------------ gradients

    def _make_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if name in ("P", "Q") and self.orth_weight > 0:
                grad = grad + self.orth_weight * self.grad_scale * self.orthogonality_grad(name)
            total = self.grad_sums.get(name)
            self.grad_sums[name] = grad.detach().clone() if total is None else total + grad.detach()
            return grad

        return hook

    @torch.no_grad()
    def orthogonality_grad(self, name: str) -> torch.Tensor:
        """``∂R/∂P = 4·P(PᵀP − I)`` or ``∂R/∂Q = 4·(QQᵀ − I)Q`` (AdaLoRA Eq. 4)."""
        eye = torch.eye(self.r, dtype=self.P.dtype, device=self.P.device)
        if name == "P":
            return 4 * self.P @ (self.P.T @ self.P - eye)
        return 4 * (self.Q @ self.Q.T - eye) @ self.Q

    def orthogonality_penalty(self) -> torch.Tensor:
        """``R = ‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F²`` (a scalar; differentiable, for reporting or own loops)."""
        eye = torch.eye(self.r, dtype=self.P.dtype, device=self.P.device)
        return (self.P.T @ self.P - eye).square().sum() + (self.Q @ self.Q.T - eye).square().sum()

    def pop_grad_sums(self) -> dict[str, torch.Tensor]:
        """The gradients summed since the last call (``{}`` when no backward ran), then cleared."""
        sums, self.grad_sums = self.grad_sums, {}
        return sums

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


class AdaLoraLinear(LoraLinear):
    """A :class:`LoraLinear` (``nn.Linear`` or ``Conv1D``) whose adapters are :class:`AdaLoraAdapter` s.

    Shapes: ``x: (..., in_features)`` -> ``(..., out_features)``;
    ``h = W x + Σ_active s · P diag(λ) Q x``.
    """

    kind = "adalora"
    inits = ("gaussian",)
    takes_lora_bias = False

    def new_adapter(self, r: int, alpha: float, scaling: float, dropout: float, *, dtype, device) -> AdaLoraAdapter:
        return AdaLoraAdapter(self.in_features, self.out_features, r, alpha, scaling, dropout,
                              dtype=dtype, device=device)

    def init_adapter(self, adapter: AdaLoraAdapter, init: str) -> None:
        """P and Q Gaussian (std :data:`INIT_STD`), λ = 0, so ΔW = 0 (AdaLoRA §3.1).

        Raises:
            LorakitError: ``init`` is not ``"gaussian"`` (other inits set LoRA's A and B).
        """
        if init not in self.inits:
            raise LorakitError(f"AdaLoRA starts P and Q Gaussian and λ at 0; init {init!r} does not apply to it, "
                               "use init='gaussian'")
        P, Q = adapter.P, adapter.Q
        P.copy_(torch.randn(P.shape, dtype=P.dtype, device=P.device) * INIT_STD)
        Q.copy_(torch.randn(Q.shape, dtype=Q.dtype, device=Q.device) * INIT_STD)
