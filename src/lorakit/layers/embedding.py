"""LoRA on ``nn.Embedding`` (weight ``(num_embeddings, embedding_dim)``).

As in loralib and PEFT, ``A: (r, num_embeddings)`` and ``B: (embedding_dim, r)``;
the adapter path looks up columns of A (``F.embedding(ids, Aᵀ)``, no one-hot) and
maps them through B::

    h = W[ids] + Σ_active s · A[:, ids]ᵀ Bᵀ

Dropout is not applied to token ids (as in PEFT).

A scaled embedding (transformers' ``...ScaledWordEmbedding`` of Gemma, BART and others: an
``nn.Embedding`` whose forward multiplies by ``embed_scale``) scales the whole output, the
adapters' share too, as PEFT does: ``h = c · (W[ids] + Σ ...)``, so a merged ΔW gives the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.layers.base import LoraLayer


class LoraEmbedding(LoraLayer):
    """Takes the place of an ``nn.Embedding``: ``ids: (...)`` long -> ``(..., embedding_dim)``.

    ``ΔW = s·(B A)ᵀ : (num_embeddings, embedding_dim)``, the layout of ``weight``.

    Raises:
        LorakitError: (per-row mode) the batch size differs from the number of rows given.
    """

    is_embedding = True

    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self.in_features, self.out_features = base.weight.shape

    def weight_to_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def _base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``W[ids]``, without the base's ``embed_scale`` (:meth:`forward` applies it to the sum)."""
        b = self._base
        return F.embedding(ids, self.weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def embed_scale(self) -> torch.Tensor | float | None:
        """The factor the base embedding's own forward multiplies its lookup by, or None."""
        return embed_scale(self._base)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._unscaled(ids)
        scale = self.embed_scale()
        return out if scale is None else out * scale

    def _unscaled(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(ids)
        if self._rows is not None:
            return self._forward_rows(ids, out)
        for ad in self._run:
            z = F.embedding(ids, ad.A.T, self._base.padding_idx)  # (..., r)
            if z.dtype == out.dtype and out.is_contiguous():
                out.view(-1, self.out_features).addmm_(z.reshape(-1, z.shape[-1]), ad.B.T, alpha=ad.scaling)
            else:
                out = out + F.linear(z * ad.scaling, ad.B).to(out.dtype)
        return out

    def _forward_rows(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row b looks its ids up in slot ``slots[b]``'s table ``Aᵀ: (num_embeddings, r_max)``."""
        slots, A_rows, B_rows = self._rows
        batch = ids.shape[0]
        if slots.shape[0] != batch:
            raise LorakitError(f"per-row adapters were given for {slots.shape[0]} rows but the batch has {batch}")
        z = A_rows[slots[:, None], ids.reshape(batch, -1)]  # (batch, tokens, r_max)
        B = B_rows.index_select(0, slots)  # (batch, r_max, dim)
        if z.dtype == out.dtype and out.is_contiguous():
            out.view(batch, -1, self.out_features).baddbmm_(z, B)
            return out
        return out + torch.bmm(z, B).to(out.dtype).view_as(out)

    def extra_repr(self) -> str:
        return f"Embedding({self.in_features}, {self.out_features}), active={list(self.active)}"


def embed_scale(embedding: nn.Embedding) -> torch.Tensor | float | None:
    """The factor ``embedding``'s own forward multiplies its lookup by (a scaled word embedding's
    ``embed_scale``), or None.

    Raises:
        LorakitError: the scale is a tensor of more than one value.
    """
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise LorakitError(f"{type(embedding).__name__}.embed_scale has shape {tuple(scale.shape)}; "
                               "an adapter on an embedding takes a single scale factor")
        weight = embedding.weight
        return scale.to(weight.dtype if weight.is_floating_point() else torch.float32)
    return scale if isinstance(scale, (int, float)) and scale != 1 else None
