"""DoRA's layer kind: weight-decomposed LoRA (Liu et al. 2024, "DoRA: Weight-Decomposed
Low-Rank Adaptation", §4), as PEFT computes it.

The adapted weight is split into a magnitude per output feature and a direction::

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖          (norm over each row of the (out, in) matrix)

with ``m: (out,)`` trained and initialised to ``‖W + s·B·A‖`` at the init (so W' = W + s·B·A
at step 0; with B = 0, ``m = ‖W‖``). Following §4.3, the norm is treated as a constant: it
is recomputed from the current A and B every forward but detached, so gradients reach m,
A and B through ``c = m / ‖W + s·B·A‖`` and ``c ⊙ (W + s·B·A)`` only. Per output feature::

    h = c ⊙ (W x + s·B A x) + b

With dropout (training only, as PEFT) the adapter sees ``x̃ = dropout(x)`` and the base
keeps x: ``h = W x + b + (c − 1) ⊙ W x̃ + c ⊙ s·B A x̃`` (one more product with W).

Several active DoRA adapters sum their changes, ``h = W x + b + Σ_i [(c_i − 1) ⊙ W x +
c_i ⊙ s_i B_i A_i x]``, and merging adds the same ``ΔW_i = (c_i − 1) ⊙ W + c_i ⊙ s_i B_i A_i``
(PEFT applies the second adapter to the first one's output instead; with one adapter the
two agree).

A layer is a :class:`~lorakit.layers.linear.LoraLinear`, ``LoraEmbedding`` or ``LoraConv``
whose adapters are :class:`DoraAdapter` s (:mod:`lorakit.layers.dora_layers`); the
``(out, in)`` view of its weight (Conv1D transposed, an embedding's ``(dim, num)``, a
kernel flattened per output channel) is what the norm is taken over, as PEFT does.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.layers.adapter import LoraAdapter
from lorakit.layers.skinny import down, grad_down, grad_up


class DoraAdapter(LoraAdapter):
    """A LoRA adapter (``A: (r, in)``, ``B: (out, r)``) with DoRA's magnitude ``m: (out,)``.

    ``magnitude`` is a plain trainable vector (1-D: no weight decay in lorakit's optimizer
    groups); a PEFT file holds it as ``lora_magnitude_vector``.
    """

    fuse_shared_input = False  # its output is rescaled per feature: not LoRA's (lorakit.layers.fused)

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, scaling: float,
                 dropout: float = 0.0, *, dtype=None, device=None):
        super().__init__(in_features, out_features, r, alpha, scaling, dropout, dtype=dtype, device=device)
        self.magnitude = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        self._norm = None  # (key, ‖W + s·B·A‖ fp32) for the key it was computed at

    def version(self) -> tuple:
        """Changes whenever A, B, m or the scaling change (see :meth:`LoraAdapter.version`)."""
        m = self.magnitude
        return super().version() + (m.data_ptr(), m._version)

    def factor_version(self) -> tuple:
        """Changes whenever A, B or the scaling change: what the norm depends on besides W."""
        return super().version()


def weight_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``‖W + s·B·A‖`` of each row: ``(out,)`` fp32 (fp64 for a fp64 W), no gradient, never an inference tensor.

    ``weight: (out, in)`` (a view is fine), ``A: (r, in)``, ``B: (out, r)``; ``weight_sq``:
    ``‖W_i‖²`` when the caller has it. Computed without forming the ``(out, in)`` sum:
    ``‖W_i + s (BA)_i‖² = ‖W_i‖² + 2s·⟨B_i, (W Aᵀ)_i⟩ + s²·B_i (A Aᵀ) B_iᵀ``, one ``(out, in)·(in, r)``
    product and ``r × r`` work (the product runs in W's dtype: bf16 for a bf16 base, as PEFT's norm).
    """
    with torch.inference_mode(False), torch.no_grad():
        acc = _accumulation(weight)
        A32, B32 = A.detach().to(acc), B.detach().to(acc)
        if weight_sq is None:
            weight_sq = row_square_norms(weight)
        WA = (weight @ A.detach().to(weight.dtype).T).to(acc)  # (out, r)
        cross = (B32 * WA).sum(1)
        lora_sq = ((B32 @ (A32 @ A32.T)) * B32).sum(1)
        return (weight_sq + (2 * scaling) * cross + (scaling * scaling) * lora_sq).clamp_min_(0).sqrt_()


def row_square_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖²`` of each row of ``weight: (out, in)``: ``(out,)`` fp32 (fp64 for a fp64 W), no gradient."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.linalg.vector_norm(weight.to(_accumulation(weight)), dim=1).square_()


def _accumulation(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class _DoraLinearFunction(torch.autograd.Function):
    """``out = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` with ``c = m / norm`` and a hand-written backward.

    ``weight``: ``(out, in)``, or ``(in, out)`` with ``fan_in_fan_out`` (Conv1D); ``norm: (out,)``
    a constant. Shapes: ``x: (..., in)``, ``A: (r, in)``, ``B: (out, r)``, ``m: (out,)`` ->
    ``(..., out)``. Saves ``x``, ``z = x Aᵀ : (N, r)`` and ``y = x (W + s·B·A)ᵀ : (N, out)`` (for
    m's gradient). Backward, with ``g̃ = g ⊙ c``: ``∂x = g̃ W + s·(g̃ B) A``, ``∂A = s·(g̃ B)ᵀ x``,
    ``∂B = s·g̃ᵀ z``, ``∂m = Σ_N (g ⊙ y) / norm``, ``∂b = Σ_N g``; the norm gets none (DoRA §4.3).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, norm, scaling: float, fan_in_fan_out: bool):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ weight if fan_in_fan_out else x2 @ weight.t()  # (N, out)
        z = down(x2, A)  # (N, r)
        y.addmm_(z, B.t(), alpha=scaling)
        c = magnitude / norm.to(magnitude.dtype)
        out = y * c if bias is None else torch.addcmul(bias, y, c)
        ctx.scaling, ctx.fan_in_fan_out, ctx.x_shape = scaling, fan_in_fan_out, x.shape
        ctx.save_for_backward(x2 if (weight.requires_grad or A.requires_grad) else None,
                              z if B.requires_grad else None, y if magnitude.requires_grad else None,
                              weight, A, B, c, norm)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, z, y, weight, A, B, c, norm = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        gc = g * c if (need_x or need_w or need_a or need_bb) else None
        g_z = grad_down(gc, B, s) if (need_x or need_a) else None  # (N, r)
        grad_x = grad_w = grad_b = grad_a = grad_bb = grad_m = None
        if need_x:
            grad_x = torch.mm(gc, weight.t() if ctx.fan_in_fan_out else weight).addmm_(g_z, A).view(ctx.x_shape)
        if need_w:
            grad_w = x2.t() @ gc if ctx.fan_in_fan_out else gc.t() @ x2
        if need_b:
            grad_b = g.sum(0)
        if need_a:
            grad_a = g_z.t() @ x2
        if need_bb:
            grad_bb = grad_up(gc, z, s)
        if need_m:
            grad_m = (g * y).sum(0).div_(norm.to(y.dtype))
        return grad_x, grad_w, grad_b, grad_a, grad_bb, grad_m, None, None, None


class DoraMixin:
    """What every DoRA layer adds to its LoRA layer (put first among the bases): the adapters
    (:class:`DoraAdapter`, m set from the init's W and factors), the norm and the scale
    ``c = m / ‖W + s·B·A‖``, the per-row stacks with ``c`` per slot, the merge of
    ``ΔW = (c − 1) ⊙ W + c ⊙ s·B·A``, and the magnitude a file holds."""

    kind = "dora"
    hosts = ("lora",)  # a plain LoRA adapter beside DoRA ones: c = 1 (a server mixing both kinds)
    fuse_shared_input = False  # its own forward (lorakit.layers.fused groups LoRA layers only)
    takes_lora_bias = False  # as in PEFT

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self._weight_sq_cache = None  # (weight's key, ‖W_i‖²)
        self._merged_scale: dict[str, torch.Tensor] = {}  # c of each merged adapter, as merged

    def new_adapter(self, r: int, alpha: float, scaling: float, dropout: float, *, dtype, device,
                    kind: str = "dora") -> LoraAdapter:
        """A DoRA adapter, or with ``kind="lora"`` a plain one (no magnitude: ``c = 1``)."""
        adapter = DoraAdapter if kind == "dora" else LoraAdapter
        return adapter(self.in_features, self.out_features, r, alpha, scaling, dropout, dtype=dtype, device=device)

    def init_adapter(self, adapter: LoraAdapter, init: str) -> None:
        """The LoRA init (which may rewrite W, as pissa does), then ``m = ‖W + s·B·A‖`` (PEFT's order)."""
        super().init_adapter(adapter, init)
        if adapter.magnitude is not None:
            adapter.magnitude.copy_(self.weight_norm(adapter))

    def own_kind(self) -> list[str]:
        return [n for n, ad in self.adapters.items() if ad.magnitude is not None]

    def export_magnitude(self, name: str) -> torch.Tensor:
        return self._adapter(name).magnitude

    # ------------------------------------------------------------------ the norm and the scale

    def _norm_weight(self) -> torch.Tensor:
        """W as ``(out, in)`` for the norm: a view of the weight, or a quantized base's weight
        dequantized (fp32; QDoRA, as PEFT takes it from a 4-bit base)."""
        if not self.base_is_quantized:
            return self.weight_out_in()
        from lorakit.layers.quantized import dense_weight

        return dense_weight(self._base)

    def _weight_sq(self) -> torch.Tensor:
        """``‖W_i‖²`` of the current weight, kept until the weight changes."""
        w = self.weight
        key = (w.data_ptr(), id(w), w._version, w.dtype)  # a quantized weight's data_ptr is 0
        if self._weight_sq_cache is None or self._weight_sq_cache[0] != key:
            self._weight_sq_cache = (key, row_square_norms(self._norm_weight()))
        return self._weight_sq_cache[1]

    def weight_norm(self, adapter: DoraAdapter) -> torch.Tensor:
        """``‖W + s·B·A‖ : (out,)`` fp32 against the current weight, detached; kept on the adapter
        until A, B, the scaling or W change (so gradient accumulation and evaluation reuse it)."""
        w = self.weight
        key = adapter.factor_version() + (w.data_ptr(), id(w), w._version)
        if adapter._norm is None or adapter._norm[0] != key:
            adapter._norm = (key, weight_norm(self._norm_weight(), adapter.A, adapter.B, adapter.scaling,
                                              self._weight_sq()))
        return adapter._norm[1]

    def dora_scale(self, adapter: LoraAdapter) -> torch.Tensor:
        """``c = m / ‖W + s·B·A‖ : (out,)`` in the adapter's dtype; differentiable in m only; ones
        for a plain adapter."""
        if adapter.magnitude is None:
            return adapter.A.new_ones(self.out_features)
        return adapter.magnitude / self.weight_norm(adapter).to(adapter.magnitude.dtype)

    # ------------------------------------------------------------------ ΔW and merging

    def _lora_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``s·B·A : (out, in)`` of adapter ``name`` in ``dtype``."""
        ad = self._adapter(name)
        return (ad.B.detach().to(dtype) @ ad.A.detach().to(dtype)) * ad.scaling

    def _scale_against(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """``c = m / ‖W + s·B·A‖`` against the unmerged ``base`` (computed directly, as PEFT's merge);
        ones for a plain adapter."""
        magnitude = self._adapter(name).magnitude
        if magnitude is None:
            return base.new_ones(base.shape[0])
        magnitude = magnitude.detach().to(base.dtype)
        return magnitude / torch.linalg.vector_norm(base + self._lora_delta(name, base.dtype), dim=1)

    def _update(self, name: str, base: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``(c − 1) ⊙ W + c ⊙ s·B·A : (out, in)`` for adapter ``name`` and the unmerged ``base``
        (``(out, in)``, fp32 or fp64); ``c`` from ``base`` unless ``scale`` gives it."""
        scale = self._scale_against(name, base) if scale is None else scale
        return (scale - 1)[:, None] * base + scale[:, None] * self._lora_delta(name, base.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """DoRA's ``ΔW = (c − 1) ⊙ W + c ⊙ s·B·A`` of adapter ``name`` in fp32, in the layout of
        ``weight``, against the unmerged weight: ``W + ΔW`` is the weight the adapter computes with."""
        with torch.no_grad():
            return self.weight_to_layout(self._update(name, self._unmerged()).float())

    def _unmerged(self) -> torch.Tensor:
        """The weight without any merged adapter, ``(out, in)``, a fp32 copy (fp64 for a fp64 W)."""
        acc = _accumulation(self.weight)
        if self._premerge_weight is not None:
            return self.as_out_in(self._premerge_weight).to(acc)
        current = self.weight_out_in().to(acc, copy=True)
        if not self.merged:
            return current
        scales = self._merged_scale
        gain = 1 + sum(scales[n] - 1 for n in self.merged)
        for n in self.merged:  # W' = gain ⊙ W + Σ c_i ⊙ s_i B_i A_i  ->  W
            current -= scales[n][:, None] * self._lora_delta(n, acc)
        return current / gain[:, None]

    def _merge_weight(self, names: list[str]) -> None:
        """``W ← W + Σ ΔW_i`` over the merged adapters and ``names``, every ΔW_i against the
        unmerged W (rebuilt first when others are merged already), computed in fp32 (fp64 for fp64)."""
        base = self._unmerged()
        scales = self._merged_scale
        for n in names:
            scales[n] = self._scale_against(n, base)
        merged = base.clone()
        for n in (*self.merged, *names):
            merged += self._update(n, base, scales[n])
        self.weight_out_in().copy_(merged.to(self.weight.dtype))

    def _unmerge_weight(self) -> None:
        """A fp32/fp64 weight: ``W = (W' − Σ c_i ⊙ s_i B_i A_i) / (1 + Σ (c_i − 1))``, exact to rounding
        while the divisor is not near 0 (each ``c_i`` near 1, as after training; one adapter: ``c``)."""
        self.weight_out_in().copy_(self._unmerged().to(self.weight.dtype))

    def unmerge(self) -> None:
        super().unmerge()
        self._merged_scale.clear()

    # ------------------------------------------------------------------ per-row stacks

    def _new_stacks(self):
        from lorakit.layers.stacks import RowStacks

        w = self.weight
        return RowStacks(self.in_features, self.out_features,
                         row_scale=lambda ad: self.dora_scale(ad).detach().to(ad.A.dtype),
                         context=lambda: (w.data_ptr(), w._version))
