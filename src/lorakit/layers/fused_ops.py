"""The arithmetic of adapters computed together on one input (see :mod:`lorakit.layers.fused`).

For members ``i`` (layers reading the same ``x: (..., in)``), each with adapters ``j``:
``Z = x·A_catᵀ : (N, R)`` with ``A_cat = [A_11; A_12; …; A_21; …] : (R, in)``, and
``out_i = x·W_iᵀ + b_i + Σ_j s_ij·Z_ij·B_ijᵀ``, where ``Z_ij`` are adapter ij's r columns of Z.
Backward (:class:`_SharedInputFunction`): ``g_Z = [s_ij·g_i·B_ij]``, ``∂x = Σ g_i·W_i + g_Z·A_cat``
in one buffer, ``∂A_cat = g_Zᵀ·x`` (one GEMM; autograd's ``cat`` splits it into the ``∂A_ij``),
``∂B_ij = s_ij·g_iᵀ·Z_ij``. Saved for backward: ``x`` (the caller's tensor), ``Z`` and ``A_cat``.
Products with R (or r) columns are computed as their transposes (:mod:`lorakit.layers.skinny`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.skinny import down, grad_down, grad_up

__all__ = ["Plan", "autocast_dtype", "in_dtype", "runnable"]


def _plain(t: torch.Tensor | None) -> bool:
    """A dense tensor of torch's own type (a Parameter of one too): no quantized weight, no
    DTensor (``nn.Parameter`` of a tensor subclass keeps the subclass's type)."""
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The compute dtype of the autocast region ``x`` is used in, or None outside one."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def in_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` cast to ``dtype`` as autocast would cast it for a product (recorded by autograd), or
    ``t`` itself when it is None or in ``dtype`` already."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def runnable(layer, adapters, x: torch.Tensor, cast: torch.dtype | None = None, dropout: bool = False) -> bool:
    """Whether ``layer``'s forward with ``adapters`` is ``x·Wᵀ + b + Σ s·(x·Aᵀ)·Bᵀ`` with plain
    parameters registered as ``weight``, ``bias``, ``A``, ``B``: in one dtype, or under autocast
    (``cast``, its compute dtype) with every tensor in that dtype or fp32, as autocast casts them.
    With ``dropout``, an adapter may drop its input first (``x`` then its dropped copy)."""
    if not getattr(layer, "fuse_shared_input", False) or layer.base_is_quantized:
        return False
    w, b = layer._parameters.get("weight"), layer.bias
    tensors = [x, w, b]
    for ad in adapters:
        if not getattr(ad, "fuse_shared_input", False) or (ad.dropout is not None and not dropout):
            return False
        tensors += [ad._parameters.get("A"), ad._parameters.get("B")]
    if w is None or any(t is None for t in tensors[3:]) or not all(_plain(t) for t in tensors[1:]):
        return False
    dtypes = {t.dtype for t in tensors if t is not None}
    allowed = {x.dtype} if cast is None else {cast, torch.float32}
    return dtypes <= allowed and w.device == x.device


class Plan:
    """What the members compute, read once from their layers and adapters: kept while every
    member's active list (a new list after any change), every parameter object and the input's
    dtype and device stay the same.

    ``spec`` (what :class:`_SharedInputFunction` needs besides tensors): per member its
    scalings, ``fan_in_fan_out``, ``out_features``, where its ``W``, ``b``, ``B`` s sit in
    ``flat``, and the columns of ``Z`` its adapters own.
    """

    def __init__(self, members: tuple, x: torch.Tensor, cast: torch.dtype | None):
        self.runs = tuple(m._run for m in members)
        self.dtype, self.device, self.cast = x.dtype, x.device, cast
        self.ok = any(self.runs) and all(runnable(m, run, x, cast) for m, run in zip(members, self.runs))
        self.params = [(m._parameters, "weight") for m in members] + [(m._parameters, "bias") for m in members]
        self.params += [(ad._parameters, k) for run in self.runs for ad in run for k in ("A", "B")]
        self.params = [(d, k, d.get(k)) for d, k in self.params]
        if not self.ok:
            return
        self.As = [ad.A for run in self.runs for ad in run]
        self.flat, layout, start = [], [], 0
        for m, run in zip(members, self.runs):
            at = len(self.flat)
            self.flat += [m.weight, m.bias, *[ad.B for ad in run]]
            cols = []
            for ad in run:
                cols.append((start, start + ad.r))
                start += ad.r
            layout.append((tuple(ad.scaling for ad in run), m.fan_in_fan_out, m.out_features, at,
                           tuple(range(at + 2, at + 2 + len(run))), tuple(cols)))
        self.spec = tuple(layout)
        with torch.inference_mode(False), torch.no_grad():  # views that follow in-place updates of B
            self.Bts = [ad.B.detach().t() for run in self.runs for ad in run]
        self._A_cat, self._A_versions = None, None

    def valid(self, members: tuple, x: torch.Tensor, cast: torch.dtype | None) -> bool:
        return (x.dtype == self.dtype and x.device == self.device and cast == self.cast
                and all(m._run is run for m, run in zip(members, self.runs))
                and all(d.get(k) is t for d, k, t in self.params))

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad
                                                                   for t in (*self.As, *self.flat)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.cast is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self._cast_forward(x)
        if self._needs_grad(x):
            A_cat = torch.cat(self.As)  # recorded by autograd: CatBackward splits ∂A_cat into the ∂A
            return list(_SharedInputFunction.apply((self.spec, self.Bts), x, A_cat, *self.flat))
        versions = [a._version for a in self.As]
        if versions != self._A_versions:  # no gradient: [A_1; A_2; ...] kept until an A changes
            with torch.no_grad():
                self._A_cat, self._A_versions = torch.cat(self.As), versions
        return _forward(self.spec, x, self._A_cat, self.flat, self.Bts)[0]

    def _cast_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Under autocast: every tensor in the compute dtype first, as autocast would cast them for
        each product (the casts recorded by autograd, so fp32 factors get fp32 gradients), then the
        same computation with autocast off."""
        grad, c = self._needs_grad(x), self.cast
        flat = [in_dtype(t, c) for t in self.flat]
        Bts = [flat[i].detach().t() for *_, b_at, _ in self.spec for i in b_at]
        A_cat, x = in_dtype(torch.cat(self.As), c), in_dtype(x, c)
        if grad:
            return list(_SharedInputFunction.apply((self.spec, Bts), x, A_cat, *flat))
        return _forward(self.spec, x, A_cat, flat, Bts)[0]


def _forward(spec, x: torch.Tensor, A_cat: torch.Tensor, flat, Bts) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(outputs shaped (..., out_i), Z: (N, R))`` for ``x: (..., in)``, ``A_cat: (R, in)`` and
    ``Bts`` the ``Bᵀ`` of ``flat``'s B s (views, made once per plan)."""
    x2 = x.reshape(-1, x.shape[-1])
    Z = down(x2, A_cat)  # (N, R): the one read of x for every adapter of every member
    lead, outs, k = x.shape[:-1], [], 0
    for scalings, fan, out_features, at, _, cols in spec:
        w, b = flat[at], flat[at + 1]
        if fan:  # Conv1D's own computation, as LoraLinear._base_forward
            out = torch.mm(x2, w) if b is None else torch.addmm(b, x2, w)
        else:
            out = F.linear(x2, w, b)
        for s, (start, end) in zip(scalings, cols):
            out.addmm_(Z.narrow(1, start, end - start), Bts[k], alpha=s)
            k += 1
        outs.append(out.view(*lead, out_features))
    return outs, Z


class _SharedInputFunction(torch.autograd.Function):
    """The group's forward and hand-written backward (see the module docstring).

    Inputs: ``(spec, Bts)`` (see :class:`Plan`), ``x: (..., in)``, ``A_cat: (R, in)`` (every
    adapter's ``A`` stacked), then per member ``W, b, B_1, B_2, ...``. Outputs: one ``(..., out_i)``
    per member.
    """

    @staticmethod
    def forward(ctx, plan, x, A_cat, *flat):
        spec, Bts = plan
        outs, Z = _forward(spec, x, A_cat, flat, Bts)
        ctx.set_materialize_grads(False)  # a member whose output is unused sends None
        ctx.spec, ctx.x_shape = spec, x.shape
        need = ctx.needs_input_grad
        x_needed = need[2] or any(need[3 + at] for *_, at, _, _ in spec)
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]) if x_needed else None, Z, A_cat, *flat)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x2, Z, A_cat, *flat = ctx.saved_tensors
        need_x, need_A, need = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        g2 = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        # g_Zᵀ = [s·g_i·B_i]ᵀ for every adapter of every member: (R, N), contiguous, each written in place
        g_Zt = Z.new_empty(Z.shape[1], Z.shape[0])
        for g, (scalings, _, _, _, b_at, cols) in zip(g2, ctx.spec):
            for s, i, (start, end) in zip(scalings, b_at, cols):
                rows = g_Zt.narrow(0, start, end - start)
                if g is None:
                    rows.zero_()
                else:
                    grad_down(g, flat[i], s, out=rows)
        grad_x = None
        if need_x:  # Σ g_i·W_i + g_Z·A_cat, one buffer
            grad_x = torch.mm(g_Zt.t(), A_cat)
            for g, (_, fan, _, at, _, _) in zip(g2, ctx.spec):
                if g is not None:
                    grad_x.addmm_(g, flat[at].t() if fan else flat[at])
            grad_x = grad_x.view(ctx.x_shape)
        grad_A_cat = torch.mm(g_Zt, x2) if need_A else None  # (R, in): every ∂A in one GEMM
        out = [None] * len(flat)
        for g, (scalings, fan, _, at, b_at, cols) in zip(g2, ctx.spec):
            if g is None:
                continue
            if need[at]:
                out[at] = x2.t() @ g if fan else g.t() @ x2
            if need[at + 1]:
                out[at + 1] = g.sum(0)
            for s, i, (start, end) in zip(scalings, b_at, cols):
                if need[i]:
                    out[i] = grad_up(g, Z.narrow(1, start, end - start), s)  # (out, r)
        return (None, grad_x, grad_A_cat, *out)
