"""AdaLoRA's layer: the update in SVD form, ``ΔW = s · P · diag(λ) · Q``.

Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(AdaLoRA, named in seed 003 as the way to choose r during training), §3.1:

- ``P: (out, r)`` and ``Q: (r, in)`` play the roles of the left/right singular vectors
  and start Gaussian; ``λ: (r,)`` plays the singular values and starts at 0, so ΔW = 0
  at step 0, as LoRA's B = 0;
- pruning a direction sets its ``λ_i`` to 0 (P and Q keep training, so it can come back
  while the budget still allows); see :mod:`.allocator`;
- the orthogonality regularizer ``R = ‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F²`` keeps P and Q close
  to orthonormal so that λ really ranks directions (§3.1, Eq. 4). It is added to the
  loss's *gradient* by hooks on P and Q (``γ · ∂R/∂P = 4γ · P(PᵀP − I)``, and
  ``4γ · (QQᵀ − I)Q``), so any training loop gets it without changing its loss.

The hooks also sum each parameter's gradient between allocator steps: the sensitivity
``|θ · ∂L/∂θ|`` the allocator scores directions by needs it after the optimizer has
cleared ``.grad``.

The layer takes the place of an ``nn.Linear`` or transformers ``Conv1D`` at the same
module path and keeps ``weight`` and ``bias`` as the very same Parameters, so the
model's state-dict keys do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError

__all__ = ["AdaLoraLinear", "INIT_STD"]

#: standard deviation of P's and Q's Gaussian init
INIT_STD = 0.02


class AdaLoraLinear(nn.Module):
    """An ``nn.Linear`` / ``Conv1D`` plus ``s · P diag(λ) Q``.

    Shapes: ``x: (..., in_features)`` -> ``(..., out_features)``; ``P: (out, r)``,
    ``lam: (r,)``, ``Q: (r, in)``; ``mask: (r,)`` buffer, 1 for directions the
    allocator keeps. ``scaling`` is ``s = alpha / r`` with the initial r (fixed while
    directions are pruned).

    Raises:
        LorakitError: ``r`` is not a positive integer ≤ min(in, out), or the base is not a linear layer.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, orth_weight: float = 0.1, grad_scale: float = 1.0):
        super().__init__()
        conv1d = type(base).__name__ == "Conv1D"
        if not (isinstance(base, nn.Linear) or conv1d):
            raise LorakitError(f"AdaLoRA wraps nn.Linear or Conv1D layers, not {type(base).__name__}")
        object.__setattr__(self, "_base", base)  # kept aside: not a submodule, no duplicate keys
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.fan_in_fan_out = conv1d
        if conv1d:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.out_features, self.in_features = base.weight.shape
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(self.in_features, self.out_features):
            raise LorakitError(f"AdaLoRA init rank {r!r} must be an integer in [1, "
                               f"{min(self.in_features, self.out_features)}] for a "
                               f"{self.out_features}×{self.in_features} layer")
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        kw = {"dtype": dtype, "device": base.weight.device}
        self.P = nn.Parameter(torch.randn(self.out_features, r, **kw) * INIT_STD)
        self.lam = nn.Parameter(torch.zeros(r, **kw))
        self.Q = nn.Parameter(torch.randn(r, self.in_features, **kw) * INIT_STD)
        self.register_buffer("mask", torch.ones(r, **kw))
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.orth_weight = float(orth_weight)
        self.grad_scale = float(grad_scale)  # 1/grad_accum: the penalty's gradient is added once per step
        self.grad_sums: dict[str, torch.Tensor] = {}
        for name in ("P", "lam", "Q"):
            getattr(self, name).register_hook(self._make_hook(name))

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

    # ------------------------------------------------------------------ the update

    def delta(self) -> torch.Tensor:
        """``s · P diag(λ) Q : (out, in)`` fp32 (pruned directions have λ = 0)."""
        return (self.P.float() * self.lam.float()) @ self.Q.float() * self.scaling

    @property
    def rank(self) -> int:
        """Directions currently kept (mask = 1)."""
        return int(self.mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan_in_fan_out:
            x2 = x.reshape(-1, x.shape[-1])
            out = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight, self.bias)
        h = x if x.dtype == self.Q.dtype else x.to(self.Q.dtype)
        z = F.linear(h, self.Q) * self.lam  # (..., r)
        return out + (F.linear(z, self.P) * self.scaling).to(out.dtype)

    def base_layer(self) -> nn.Module:
        """The original module, sharing ``weight`` and ``bias`` with this layer."""
        return self._base

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"kept={self.rank}, scaling={self.scaling:g}")
