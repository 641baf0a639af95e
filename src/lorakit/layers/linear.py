"""LoRA on a dense layer: ``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D``
(GPT-2; weight ``(in, out)``, i.e. ``fan_in_fan_out``).

Forward (LoRA §4.1, seeds 001–003)::

    h = W x + b + Σ_active  s · B (A · dropout(x))

computed as one base GEMM, then per adapter ``z = x Aᵀ : (..., r)`` and an in-place
``out += s · z Bᵀ`` (``addmm_`` with ``alpha = s``): the scaling costs nothing, no
copy of ``x`` is made when dropout is 0, and no ``(…, out)`` temporary is allocated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.layers.base import LoraLayer

try:  # transformers is a dependency, but the layer must not fail without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


class LoraLinear(LoraLayer):
    """Takes the place of an ``nn.Linear`` or ``Conv1D`` at the same module path.

    Shapes: ``x: (..., in_features)`` -> ``(..., out_features)``; each adapter holds
    ``A: (r, in_features)``, ``B: (out_features, r)``.

    Raises:
        LorakitError: (per-row mode) the batch size differs from the number of rows given.
    """

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.register_parameter("bias", base.bias)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.out_features, self.in_features = base.weight.shape

    def weight_to_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T if self.fan_in_fan_out else matrix

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fan_in_fan_out:
            return F.linear(x, self.weight, self.bias)
        # Conv1D's own computation, so the base output is bit-identical to the unwrapped model.
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self._rows is not None:
            return self._forward_rows(x, out)
        for ad in self._run:
            h = x if ad.dropout is None else ad.dropout(x)
            if h.dtype != ad.A.dtype:
                h = h.to(ad.A.dtype)
            z = F.linear(h, ad.A)  # (..., r)
            if z.dtype == out.dtype and out.is_contiguous():
                out.view(-1, self.out_features).addmm_(z.reshape(-1, z.shape[-1]), ad.B.T, alpha=ad.scaling)
            else:
                out = out + F.linear(z * ad.scaling, ad.B).to(out.dtype)
        return out

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row b of the batch gets adapter slot ``slots[b]``: one gather and two bmm."""
        slots, A_rows, B_rows = self._rows
        batch = x.shape[0]
        if slots.shape[0] != batch:
            raise LorakitError(f"per-row adapters were given for {slots.shape[0]} rows but the batch has {batch}")
        x3 = x.reshape(batch, -1, self.in_features)
        if x3.dtype != A_rows.dtype:
            x3 = x3.to(A_rows.dtype)
        z = torch.bmm(x3, A_rows.index_select(0, slots))  # (batch, tokens, r_max)
        B = B_rows.index_select(0, slots)  # (batch, r_max, out), scaling folded in
        if z.dtype == out.dtype and out.is_contiguous():
            out.view(batch, -1, self.out_features).baddbmm_(z, B)
            return out
        return out + torch.bmm(z, B).to(out.dtype).view_as(out)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return f"{kind}(in_features={self.in_features}, out_features={self.out_features}), active={list(self.active)}"
