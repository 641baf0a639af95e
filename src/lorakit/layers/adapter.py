"""One LoRA adapter's parameters: the factors ``A``, ``B`` (and B's bias with PEFT's
``lora_bias``), its rank, alpha, scaling and dropout. A layer (:mod:`.base`) holds them by name."""

from __future__ import annotations

import torch
from torch import nn


class LoraAdapter(nn.Module):
    """One adapter's factors: ``A: (r, in_features)``, ``B: (out_features, r)``, and with
    ``bias`` (PEFT's ``lora_bias``) B's bias ``b: (out_features,)``, which adds ``s·b``.

    For an embedding ``in_features`` is ``num_embeddings`` and ``out_features`` is
    ``embedding_dim`` (PEFT's layout). ``scaling`` is ``s`` of ``ΔW = s·B·A``, computed
    by :meth:`lorakit.config.LoraConfig.scaling_for`.
    """

    #: its layer may compute it together with siblings' adapters on a shared input (layers/fused.py)
    fuse_shared_input = True
    #: an activated adapter's :class:`lorakit.alora.Activation` (where in each row it applies), else None
    activation = None

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, scaling: float,
                 dropout: float = 0.0, *, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        # DoRA's magnitude m: (out,) (lorakit.layers.dora.DoraAdapter); None: a plain adapter, which a
        # DoRA layer holding it computes with c = 1
        self.magnitude = None
        if bias:  # the shared-input and one-function paths compute x·Wᵀ + b + s·z·Bᵀ only
            self.fuse_shared_input = False
        self.r = r
        self.alpha = alpha
        self.scaling = float(scaling)
        # No module at all when p = 0, so forward never touches (or copies) x for it.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def dropping(self) -> bool:
        """Whether dropout changes the adapter's input now (a dropout module in training mode)."""
        return self.dropout is not None and self.dropout.training

    def delta(self) -> torch.Tensor:
        """``s·B·A : (out_features, in_features)`` in fp32."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: (r, in), B: (out, r))`` as an adapter file holds them (``ΔW = scaling·B·A``)."""
        return self.A, self.B

    def version(self) -> tuple:
        """Changes whenever A, B or the scaling change (an optimizer step, a ``copy_``): what
        :mod:`lorakit.layers.stacks` compares to keep a per-row slot up to date."""
        A, B, b = self.A, self.B, self.bias
        version = A.data_ptr(), A._version, B.data_ptr(), B._version, self.scaling, self.r
        return version if b is None else version + (b.data_ptr(), b._version)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
