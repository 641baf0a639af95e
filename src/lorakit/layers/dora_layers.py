"""DoRA's wrappers, one per base type: :class:`DoraLinear` (``nn.Linear``, ``Conv1D``),
:class:`DoraEmbedding` and :class:`DoraConv` (the math is :mod:`lorakit.layers.dora`).

Every forward computes ``h = W x + b + Σ_i [(c_i − 1) ⊙ W x̃ + c_i ⊙ s_i B_i A_i x̃]`` with
``c_i = m_i / ‖W + s_i B_i A_i‖`` per output feature (``x̃`` the adapter's input, dropped
out in training). One adapter training without dropout, the common case, is one
function with a hand-written backward (:class:`~lorakit.layers.dora._DoraLinearFunction`);
per-row batches add one multiply by each row's ``c`` (stacked per slot) to LoRA's gather
and two ``bmm``: no loop over adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.layers.conv import LoraConv
from lorakit.layers.dora import DoraMixin, _DoraLinearFunction
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear


def _check_rows(slots: torch.Tensor, batch: int) -> None:
    if slots.shape[0] != batch:
        raise LorakitError(f"per-row adapters were given for {slots.shape[0]} rows but the batch has {batch}")


def _scaled(base: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``scale ⊙ (base + lora) + bias`` (broadcasting), in place in ``base`` when autograd records nothing."""
    lora, scale = lora.to(base.dtype), scale.to(base.dtype)
    if torch.is_grad_enabled() and (base.requires_grad or lora.requires_grad or scale.requires_grad):
        out = (base + lora) * scale
        return out if bias is None else out + bias
    out = base.add_(lora).mul_(scale)
    return out if bias is None else out.add_(bias)


def _added(out: torch.Tensor, hw: torch.Tensor, lora: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``out + (c − 1) ⊙ W x̃ + c ⊙ lora``: one adapter's change among several, or with dropout."""
    return out + (c - 1).to(out.dtype) * hw + (c * lora).to(out.dtype)


class DoraLinear(DoraMixin, LoraLinear):
    """DoRA on an ``nn.Linear`` or ``Conv1D``: ``x: (..., in)`` -> ``(..., out)``."""

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` without the bias (Conv1D's own product for a Conv1D; a quantized base's own
        forward, which dequantizes its weight, less the bias)."""
        if self.base_is_quantized:
            out = self._base(x)
            return out if self.bias is None else out - self.bias.to(out.dtype)
        if not self.fan_in_fan_out:
            return F.linear(x, self.weight)
        return (x.reshape(-1, x.shape[-1]) @ self.weight).view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._run
        if self._rows is not None:
            return self._forward_rows(x)
        if not run:
            return self._base_forward(x)
        ad = run[0]
        if (len(run) == 1 and ad.magnitude is not None and torch.is_grad_enabled() and not ad.dropping()
                and self._one_function(x, ad)):
            return _DoraLinearFunction.apply(x, self.weight, self.bias, ad.A, ad.B, ad.magnitude,
                                             self.weight_norm(ad), ad.scaling, self.fan_in_fan_out)
        base = self._linear(x)
        if len(run) == 1 and not ad.dropping():  # c ⊙ (W x + s·B A x) + b
            return _scaled(base, self._lora(x, ad), self.dora_scale(ad), self.bias)
        out = base if self.bias is None else base + self.bias
        for ad in run:
            h = ad.dropout(x) if ad.dropping() else x
            out = _added(out, base if h is x else self._linear(h), self._lora(h, ad), self.dora_scale(ad))
        return out

    def _lora(self, h: torch.Tensor, ad) -> torch.Tensor:
        """``s·B A h`` in the adapter's dtype."""
        h = h if h.dtype == ad.A.dtype else h.to(ad.A.dtype)
        return F.linear(F.linear(h, ad.A) * ad.scaling, ad.B)

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Row b: ``c_b ⊙ (x Wᵀ + z_b (s·B_b)ᵀ) + b`` with slot ``slots[b]``'s stacks."""
        slots, A_rows, B_rows, S_rows = self._rows
        batch = x.shape[0]
        _check_rows(slots, batch)
        y = self._linear(x)
        x3 = x.reshape(batch, -1, self.in_features)
        if x3.dtype != A_rows.dtype:
            x3 = x3.to(A_rows.dtype)
        z = torch.bmm(x3, A_rows.index_select(0, slots))  # (batch, tokens, r_max)
        lora = torch.bmm(z, B_rows.index_select(0, slots))  # (batch, tokens, out)
        out = _scaled(y.view(batch, -1, self.out_features), lora, S_rows.index_select(0, slots)[:, None, :], self.bias)
        return out.view_as(y)


class DoraEmbedding(DoraMixin, LoraEmbedding):
    """DoRA on an ``nn.Embedding``: ``ids: (...)`` -> ``(..., dim)``; ``m`` and the norm are per
    embedding dimension (over all rows of the table), as PEFT."""

    def _unscaled(self, ids: torch.Tensor) -> torch.Tensor:  # LoraEmbedding.forward applies embed_scale
        base = self._base_forward(ids)
        if self._rows is not None:
            slots, A_rows, B_rows, S_rows = self._rows
            batch = ids.shape[0]
            _check_rows(slots, batch)
            z = A_rows[slots[:, None], ids.reshape(batch, -1)]  # (batch, tokens, r_max)
            lora = torch.bmm(z, B_rows.index_select(0, slots))
            scale = S_rows.index_select(0, slots)[:, None, :]
            return _scaled(base.view(batch, -1, self.out_features), lora, scale, None).view_as(base)
        run = self._run
        if len(run) == 1:
            return _scaled(base, self._lora(ids, run[0]), self.dora_scale(run[0]), None)
        out = base
        for ad in run:
            out = _added(out, base, self._lora(ids, ad), self.dora_scale(ad))
        return out

    def _lora(self, ids: torch.Tensor, ad) -> torch.Tensor:
        """``s·B A[:, ids]`` (no dropout on token ids)."""
        return F.linear(F.embedding(ids, ad.A.T, self._base.padding_idx) * ad.scaling, ad.B)


class DoraConv(DoraMixin, LoraConv):
    """DoRA on an ``nn.Conv1d/2d/3d`` (groups 1): ``m`` and the norm are per output channel,
    over the channel's whole kernel, as PEFT."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is None and not self._run:
            return self._base_forward(x)
        base = self.conv(x, self.weight)
        bias = None if self.bias is None else self.channel_view(self.bias)
        if self._rows is not None:
            slots, A_rows, B_rows, S_rows = self._rows
            z = self.rows_down(x, slots, A_rows)
            lora = torch.bmm(B_rows.index_select(0, slots).transpose(1, 2), z)  # (batch, out, spatial'·)
            scale = S_rows.index_select(0, slots)[:, :, None]
            out = _scaled(base.view(*lora.shape), lora, scale, None).view_as(base)
            return out if bias is None else out + bias
        run = self._run
        if len(run) == 1 and not run[0].dropping():
            return _scaled(base, self._lora(x, run[0]), self.channel_view(self.dora_scale(run[0])), bias)
        out = base if bias is None else base + bias
        for ad in run:
            h = ad.dropout(x) if ad.dropping() else x
            hw = base if h is x else self.conv(h, self.weight)
            out = _added(out, hw, self._lora(h, ad), self.channel_view(self.dora_scale(ad)))
        return out

    def _lora(self, h: torch.Tensor, ad) -> torch.Tensor:
        """``s·B ⊛ (A ⊛ h)`` in the adapter's dtype."""
        h = h if h.dtype == ad.A.dtype else h.to(ad.A.dtype)
        return self.up(self.down(h, ad.A) * ad.scaling, ad.B)
