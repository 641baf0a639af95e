"""LoRA on a dense layer: ``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D``
(GPT-2; weight ``(in, out)``, i.e. ``fan_in_fan_out``).

Forward (LoRA §4.1, seeds 001–003)::

    h = W x + b + Σ_active  s · B (A · dropout(x))

computed as one base GEMM, then per adapter ``z = x Aᵀ : (..., r)`` and an in-place
``out += s · z Bᵀ`` (``addmm_`` with ``alpha = s``): the scaling costs nothing, no
copy of ``x`` is made when dropout is 0, and no ``(…, out)`` temporary is allocated.
Each product with r columns is computed as its transpose (:mod:`lorakit.layers.skinny`).
An adapter with a bias on B (PEFT's ``lora_bias``) adds ``s·b`` as well, on this generic path.

Training with one adapter goes through :class:`_LoraLinearFunction`, whose backward is
written out: ``g_z = s·g B`` once, ``∂x = g W + g_z A`` accumulated into one buffer,
``∂A = g_zᵀ x``, ``∂B = s·gᵀ z``. It saves only ``x`` (the very tensor the caller
holds) and ``z : (..., r)``. Autograd's own graph of the same forward would clone the
whole ``(…, out)`` gradient for the in-place ``addmm_`` on a view (``CopySlices``) and
add two ``(…, in)`` input gradients; PEFT's ``out + B(A x)·s`` adds an elementwise
multiply and add of ``(…, out)`` tensors each way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.dense import is_conv1d, linear_features
from lorakit.errors import LorakitError
from lorakit.layers.base import LoraLayer
from lorakit.layers.fused_ops import autocast_dtype, in_dtype, runnable
from lorakit.layers.skinny import down, grad_down, grad_up


class _LoraLinearFunction(torch.autograd.Function):
    """``out = x Wᵀ + b + s·(h Aᵀ) Bᵀ`` with a hand-written backward (see the module docstring).

    ``h`` is ``dropout(x)`` or None when there is no dropout (then ``h = x``, saved once).
    ``weight`` is ``(out, in)``, or ``(in, out)`` with ``fan_in_fan_out`` (Conv1D).
    Shapes: ``x, h: (..., in)``, ``A: (r, in)``, ``B: (out, r)`` -> ``(..., out)``.
    """

    @staticmethod
    def forward(ctx, x, h, weight, bias, A, B, scaling: float, fan_in_fan_out: bool):
        x2 = x.reshape(-1, x.shape[-1])
        h2 = x2 if h is None else h.reshape(-1, h.shape[-1])
        if fan_in_fan_out:  # Conv1D's own computation, as in LoraLinear._base_forward
            out = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
        else:
            out = F.linear(x2, weight, bias)
        z = down(h2, A)  # (N, r)
        out.addmm_(z, B.t(), alpha=scaling)
        ctx.scaling, ctx.fan_in_fan_out, ctx.has_h = scaling, fan_in_fan_out, h is not None
        ctx.x_shape, ctx.h_shape = x.shape, None if h is None else h.shape
        need_x = weight.requires_grad or (h is None and A.requires_grad)
        need_h = h is not None and A.requires_grad
        ctx.save_for_backward(x2 if need_x else None, h2 if need_h else None, z if B.requires_grad else None,
                              weight, A, B)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, h2, z, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, need_h, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:6]
        g_z = grad_down(g, B, s) if (need_h or need_a or (need_x and not ctx.has_h)) else None  # (N, r)
        grad_x = grad_h = grad_w = grad_b = grad_a = grad_bb = None
        if need_x:
            grad_x = torch.mm(g, weight.t() if ctx.fan_in_fan_out else weight)  # (N, in)
            if not ctx.has_h:
                grad_x.addmm_(g_z, A)
            grad_x = grad_x.view(ctx.x_shape)
        if need_h:
            grad_h = torch.mm(g_z, A).view(ctx.h_shape)
        if need_w:
            grad_w = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if need_b:
            grad_b = g.sum(0)
        if need_a:
            grad_a = g_z.t() @ (x2 if h2 is None else h2)  # (r, in)
        if need_bb:
            grad_bb = grad_up(g, z, s)  # (out, r)
        return grad_x, grad_h, grad_w, grad_b, grad_a, grad_bb, None, None


class LoraLinear(LoraLayer):
    """Takes the place of an ``nn.Linear`` or ``Conv1D`` at the same module path.

    Shapes: ``x: (..., in_features)`` -> ``(..., out_features)``; each adapter holds
    ``A: (r, in_features)``, ``B: (out_features, r)``.

    Raises:
        LorakitError: (per-row mode) the batch size differs from the number of rows given.
    """

    #: siblings reading the same input may compute this layer's adapters with theirs (:mod:`.fused`)
    fuse_shared_input = True
    takes_lora_bias = True
    #: a per-row batch's :class:`lorakit.alora.RowGate` while rows choose activated adapters (aLoRA)
    row_gate = None

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self._group = None  # a layers.fused.SharedInputGroup, set by group_shared_inputs
        self.register_parameter("bias", base.bias)
        self.fan_in_fan_out = is_conv1d(base)
        self.in_features, self.out_features = linear_features(base)

    def weight_to_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T if self.fan_in_fan_out else matrix

    def replace_base(self, new: nn.Module) -> None:
        super().replace_base(new)
        self.fan_in_fan_out = is_conv1d(new)  # a Conv1D's quantized copy stores (out, in)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_is_quantized:  # it dequantizes its own weight (lorakit.layers.quantized)
            return self._base(x)
        if not self.fan_in_fan_out:
            return F.linear(x, self.weight, self.bias)
        # Conv1D's own computation, so the base output is bit-identical to the unwrapped model.
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run, group = self._run, self._group
        if not run and self._rows is None and (group is None or group.idle()):
            return self._base_forward(x)  # merged, disabled or no adapter active: the base alone
        if group is not None:  # computed with its siblings when they read this same x
            out = group.forward(self, x)
            if out is not None:
                return out
        if not run and self._rows is None:  # its siblings have adapters to run, it has none
            return self._base_forward(x)
        if self._rows is None and len(run) == 1 and torch.is_grad_enabled():
            ad = run[0]
            if self._one_function(x, ad):
                return self._function_forward(x, ad)
            cast = autocast_dtype(x)
            if cast is not None and runnable(self, run, x, cast, dropout=True):
                return self._function_forward(x, ad, cast)
        out = self._base_forward(x)
        if self._rows is not None:
            return self._forward_rows(x, out)
        # In place only when autograd does not record it (an in-place op on a view would
        # make it clone the whole output gradient in backward).
        in_place = not (torch.is_grad_enabled() and (out.requires_grad or any(
            ad.A.requires_grad or ad.B.requires_grad or (ad.bias is not None and ad.bias.requires_grad)
            for ad in run)))
        for ad in run:
            h = x if ad.dropout is None else ad.dropout(x)
            if getattr(ad, "activation", None) is not None:  # aLoRA: zero before the invocation (lorakit.alora)
                h = ad.activation.masked(h)
            if h.dtype != ad.A.dtype:
                h = h.to(ad.A.dtype)
            z2 = down(h.reshape(-1, self.in_features), ad.A)  # (N, r)
            if z2.dtype == out.dtype == ad.B.dtype and out.is_contiguous():  # not under autocast
                if in_place:
                    out.view(-1, self.out_features).addmm_(z2, ad.B.T, alpha=ad.scaling)
                else:
                    out = torch.addmm(out.view(-1, self.out_features), z2, ad.B.T, alpha=ad.scaling).view_as(out)
            else:
                out = out + F.linear(z2 * ad.scaling, ad.B).to(out.dtype).view_as(out)
            if ad.bias is not None:  # lora_bias: s·b
                b = ad.bias.to(out.dtype)
                out = out.add_(b, alpha=ad.scaling) if in_place else out + b * ad.scaling
        return out

    def _one_function(self, x: torch.Tensor, ad) -> bool:
        """Whether :class:`_LoraLinearFunction` computes this forward: a dense base, something
        needs a gradient, one dtype throughout (no autocast, no fp32 adapter on a bf16 weight)."""
        tensors = (x, self.weight, ad.A, ad.B) + (() if self.bias is None else (self.bias,))
        if self.base_is_quantized or ad.bias is not None or getattr(ad, "activation", None) is not None or \
                not any(t.requires_grad for t in tensors):
            return False
        dtype = x.dtype
        return (all(t.dtype == dtype for t in tensors) and x.device == self.weight.device
                and not torch.is_autocast_enabled(x.device.type))

    def _function_forward(self, x: torch.Tensor, ad, cast: torch.dtype | None = None) -> torch.Tensor:
        """One adapter through :class:`_LoraLinearFunction` (its dropout, if any, on the adapter's input).

        Under autocast (``cast``, its compute dtype): every tensor in that dtype first, as autocast would
        cast them for each product (the casts recorded by autograd, so fp32 factors get fp32 gradients),
        then the function with autocast off: three products and no elementwise kernels where autocast's
        own path launches ten (fewer launches: what a GPU step waits on)."""
        h = None if ad.dropout is None else ad.dropout(x)
        tensors = (x, None if h is x else h, self.weight, self.bias, ad.A, ad.B)
        if cast is None:
            return _LoraLinearFunction.apply(*tensors, ad.scaling, self.fan_in_fan_out)
        with torch.autocast(x.device.type, enabled=False):
            return _LoraLinearFunction.apply(*(in_dtype(t, cast) for t in tensors), ad.scaling, self.fan_in_fan_out)

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row b of the batch gets adapter slot ``slots[b]``: one gather and two bmm (and one
        gather of the slots' ``s·b`` when adapters have a bias on B)."""
        slots, A_rows, B_rows, *biases = self._rows
        batch = x.shape[0]
        if slots.shape[0] != batch:
            raise LorakitError(f"per-row adapters were given for {slots.shape[0]} rows but the batch has {batch}")
        x3 = x.reshape(batch, -1, self.in_features)
        if self.row_gate is not None:  # rows of activated adapters: zero before their invocation
            x3 = self.row_gate.masked(x3)
        if x3.dtype != A_rows.dtype:
            x3 = x3.to(A_rows.dtype)
        z = torch.bmm(x3, A_rows.index_select(0, slots))  # (batch, tokens, r_max)
        B = B_rows.index_select(0, slots)  # (batch, r_max, out), scaling folded in
        if z.dtype == out.dtype == B.dtype and out.is_contiguous():  # not under autocast
            out3 = out.view(batch, -1, self.out_features).baddbmm_(z, B)
            if biases:
                out3.add_(biases[0].index_select(0, slots).unsqueeze(1))
            return out
        added = torch.bmm(z, B)
        if biases:
            added = added + biases[0].index_select(0, slots).unsqueeze(1)
        return out + added.to(out.dtype).view_as(out)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return f"{kind}(in_features={self.in_features}, out_features={self.out_features}), active={list(self.active)}"
