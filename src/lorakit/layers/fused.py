"""Adapters that read one input, computed together: q/k/v, gate/up (a run-time detail).

In a transformer block several adapted layers read the very same tensor: a Llama block's
``q_proj``, ``k_proj`` and ``v_proj`` the normed hidden states, ``gate_proj`` and
``up_proj`` the normed attention output. Each rank-r product ``x·Aᵀ`` reads the whole
activation for r columns (memory-bound), and its backward reads ``x`` again for ``∂A``
and writes ``(…, in)`` once more for ``∂x``. A :class:`SharedInputGroup` computes the
members together when the first of them is called:

- forward: ``Z = x·[A_q; A_k; A_v]ᵀ : (N, Σr)`` in one GEMM (one read of ``x``), each
  member's ``out_i = x·W_iᵀ + b_i + Σ s·Z_i·B_iᵀ``; the other members' outputs are handed
  to them when they are called with the same tensor;
- backward (one autograd node for the group, :class:`_SharedInputFunction`):
  ``g_Z = [s·g_i·B_i]`` once, ``∂x = Σ g_i·W_i + g_Z·A_cat`` written into one buffer (no
  autograd sum of three ``(N, in)`` gradients), ``∂A_cat = g_Zᵀ·x`` in one GEMM, split
  into the members' ``∂A``; ``∂B_i = s·g_iᵀ·Z_i``.

Nothing is stored differently: module paths, parameters, state-dict keys and files are
those of the separate layers. Groups come from the model's structure
(:func:`group_shared_inputs`: sibling :class:`~lorakit.layers.linear.LoraLinear` s under one
parent with the same ``in_features``) and are confirmed at run time: during the first pass
the members run on their own and the group notes which of them receive the very tensor
the first one received (an ``o_proj`` beside ``q_proj`` does not); from the next pass on
those are computed together. A follower called with another tensor (or in another grad
mode) runs on its own, and the group turns itself off for good: correct whatever the
model does, and wasteful at most once.

It does not apply (the members run on their own, exactly as without groups) under
``torch.compile`` (the compiler sees the plain layers), with LoRA dropout (each adapter
draws its own mask), under autocast or with mixed dtypes, on a layer kind or adapter that
does not set ``fuse_shared_input = True`` (AdaLoRA's adapters do not; DoRA can set it
False), on a base weight or factor that is not a plain dense tensor (a quantized base, an
FSDP-sharded ``DTensor``), and when all members are merged or disabled.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.linear import LoraLinear

__all__ = ["SharedInputGroup", "group_shared_inputs", "shared_input_groups", "ungroup"]

_PROBING, _FUSED, _OFF = "probing", "fused", "off"


def _plain(t: torch.Tensor | None) -> bool:
    """A dense tensor of torch's own type (a Parameter of one too): no quantized weight, no DTensor."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor)


def _runnable(layer, adapters, x: torch.Tensor) -> bool:
    """Whether ``layer``'s forward with ``adapters`` is ``x·Wᵀ + b + Σ s·(x·Aᵀ)·Bᵀ`` in one dtype."""
    if not getattr(layer, "fuse_shared_input", False):
        return False
    w, b = layer.weight, layer.bias
    if not (_plain(w) and _plain(b) and w.dtype == x.dtype and w.device == x.device):
        return False
    for ad in adapters:
        if not getattr(ad, "fuse_shared_input", False) or ad.dropout is not None:
            return False
        A, B = ad.A, ad.B
        if not (_plain(A) and _plain(B) and A.dtype == B.dtype == x.dtype):
            return False
    return True


class SharedInputGroup:
    """Sibling LoRA layers that may read one input (see the module docstring).

    Attributes:
        members: the candidate layers, in module order.
        leader: the member called first in a pass (once confirmed), which computes the group.
        followers: the members confirmed to read the leader's input.
        state: ``"probing"`` (first pass), ``"fused"`` or ``"off"``.
        fused_calls: forwards computed together so far (for tests and benchmarks).
    """

    def __init__(self, members: Iterable[nn.Module]):
        self.members = tuple(members)
        self.reset()

    def reset(self) -> None:
        """Forget what was learnt: probe again from the next call."""
        self.state = _PROBING
        self.leader, self.followers = None, ()
        self.fused_calls = 0
        self._first = None  # (layer, weakref to its input) of the probing pass
        self._same: list = []  # members that received the first's input in the probing pass
        self._seen: list = []  # every member called in the probing pass
        self._rows_cache = None
        self._clear()

    def _clear(self) -> None:
        self._pending_x = self._pending_version = self._pending_grad = None
        self._pending: dict = {}

    def __deepcopy__(self, memo):  # a copied model gets a fresh group of its copied layers
        from copy import deepcopy

        return SharedInputGroup(deepcopy(m, memo) for m in self.members)

    def __getstate__(self):  # pickling (torch.save of a whole model) keeps the members alone
        return {"members": self.members}

    def __setstate__(self, state):
        self.members = state["members"]
        self.reset()

    # ------------------------------------------------------------------ the hook

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output when the group computes it, else None (the layer runs on its own)."""
        if torch.compiler.is_compiling():
            return None
        if self.state is _PROBING and not self._probe(layer, x):
            return None
        if self.state is _FUSED:
            return self._lead(x) if layer is self.leader else self._follow(layer, x)
        return None

    def _probe(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Note who reads what in the first pass; True once the pass is over (decided)."""
        if any(m is layer for m in self._seen):  # called again: the probing pass is over
            self._decide()
            return True
        self._seen.append(layer)
        if self._first is None:
            self._first = (layer, weakref.ref(x))
        elif self._first[1]() is x:
            self._same.append(layer)
        return False

    def _decide(self) -> None:
        if self._same:
            self.state, self.leader, self.followers = _FUSED, self._first[0], tuple(self._same)
        else:
            self.state = _OFF
        self._first, self._same, self._seen = None, [], []

    def stacked_rows(self, A_rows: list[torch.Tensor]) -> torch.Tensor:
        """The members' per-row stacks side by side, ``(slots, in, Σ r_max)``; kept until a
        stack is reallocated or rewritten (compared by identity and version)."""
        key = [(a, a._version) for a in A_rows]
        cached = self._rows_cache
        if cached is not None and len(cached[0]) == len(key) and all(
                a is b and v == w for (a, v), (b, w) in zip(cached[0], key)):
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            stacked = torch.cat(A_rows, dim=2)
        self._rows_cache = (key, stacked)
        return stacked

    def _turn_off(self) -> None:
        self.state = _OFF
        self._clear()

    def _follow(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        out = self._pending.pop(layer, None)
        if out is None:
            if self._pending_x is not None:  # the leader computed this pass, for another input
                self._turn_off()
            return None
        if (x is not self._pending_x or torch.is_grad_enabled() != self._pending_grad
                or (self._pending_version is not None and x._version != self._pending_version)):
            self._turn_off()
            return None
        if not self._pending:
            self._clear()
        return out

    def _lead(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._pending:  # a follower was not called with the last input: the guess was wrong
            self._turn_off()
            return None
        self._clear()
        members = (self.leader,) + self.followers
        outs = _compute(self, members, x)
        if outs is None:
            return None
        self.fused_calls += 1
        self._pending = dict(zip(self.followers, outs[1:]))
        self._pending_x, self._pending_grad = x, torch.is_grad_enabled()
        self._pending_version = None if x.is_inference() else x._version
        return outs[0]


# ---------------------------------------------------------------------- the computation


def _compute(group: SharedInputGroup, members: tuple, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Every member's output for ``x``, or None where computing them together does not apply."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    rows = [m._rows for m in members]
    if any(r is not None for r in rows):
        return _compute_rows(group, members, x, rows)
    runs = [m._run for m in members]
    if not any(runs) or not all(_runnable(m, run, x) for m, run in zip(members, runs)):
        return None
    weights = [(m.weight, m.bias) for m in members]
    adapters = [[(ad.A, ad.B) for ad in run] for run in runs]
    spec = (tuple(tuple(ad.scaling for ad in run) for run in runs), tuple(m.fan_in_fan_out for m in members),
            tuple(m.out_features for m in members))
    flat = [t for (w, b), ads in zip(weights, adapters) for t in (w, b, *[f for ab in ads for f in ab])]
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in flat)):
        return list(_SharedInputFunction.apply(spec, x, *flat))
    return _forward(spec, x, flat)[0]


def _positions(spec) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Where each member's ``W``, ``b`` and ``(A, B)`` pairs sit in the flat tensor list."""
    out, i = [], 0
    for scalings in spec[0]:
        out.append((i, i + 1, [(i + 2 + 2 * j, i + 3 + 2 * j) for j in range(len(scalings))]))
        i += 2 + 2 * len(scalings)
    return out


def _unflatten(spec, flat):
    """``[(W, b, [(A, B), ...]), ...]`` per member from the flat tensor list."""
    return [(flat[w], flat[b], [(flat[a], flat[bb]) for a, bb in pairs]) for w, b, pairs in _positions(spec)]


def _forward(spec, x: torch.Tensor, flat) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list]:
    """``(outputs, Z: (N, R), A_cat: (R, in), column ranges)``, outputs shaped as ``x`` with each member's out."""
    scalings, fan_in_fan_out, out_features = spec
    members = _unflatten(spec, flat)
    x2 = x.reshape(-1, x.shape[-1])
    A_cat = torch.cat([A for _, _, pairs in members for A, _ in pairs])  # (R, in)
    Z = x2 @ A_cat.t()  # (N, R): the one read of x for every adapter of every member
    outs, cols, start = [], [], 0
    for (w, b, pairs), s_i, fan, out_f in zip(members, scalings, fan_in_fan_out, out_features):
        if fan:  # Conv1D's own computation, as LoraLinear._base_forward
            out = x2 @ w if b is None else torch.addmm(b, x2, w)
        else:
            out = F.linear(x2, w, b)
        for (A, B), s in zip(pairs, s_i):
            end = start + A.shape[0]
            out.addmm_(Z[:, start:end], B.t(), alpha=s)
            cols.append((start, end))
            start = end
        outs.append(out.view(*x.shape[:-1], out_f))
    return outs, Z, A_cat, cols


class _SharedInputFunction(torch.autograd.Function):
    """The group's forward and hand-written backward (see the module docstring).

    Inputs: ``spec`` (scalings per member, fan_in_fan_out flags, out_features), ``x: (..., in)``,
    then per member ``W, b, A_1, B_1, A_2, B_2, ...``. Outputs: one ``(..., out_i)`` per member.
    """

    @staticmethod
    def forward(ctx, spec, x, *flat):
        outs, Z, A_cat, cols = _forward(spec, x, flat)
        ctx.set_materialize_grads(False)  # a member whose output is unused sends None
        ctx.spec, ctx.cols, ctx.x_shape = spec, cols, x.shape
        need = ctx.needs_input_grad[2:]
        x_needed = any(need[w] or any(need[a] for a, _ in pairs) for w, _, pairs in _positions(spec))
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]) if x_needed else None, Z, A_cat, *flat)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x2, Z, A_cat, *flat = ctx.saved_tensors
        scalings, fan_in_fan_out, _ = ctx.spec
        members = _unflatten(ctx.spec, flat)
        need = ctx.needs_input_grad[2:]
        g2 = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        N = Z.shape[0]
        # g_Z = [s·g_i·B_i] for every adapter of every member: (N, R)
        pieces = []
        for g, (_, _, pairs), s_i in zip(g2, members, scalings):
            for (A, B), s in zip(pairs, s_i):
                pieces.append(Z.new_zeros(N, A.shape[0]) if g is None else torch.mm(g, B).mul_(s))
        g_Z = torch.cat(pieces, dim=1)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.mm(g_Z, A_cat)  # (N, in)
            for g, (w, _, _), fan in zip(g2, members, fan_in_fan_out):
                if g is not None:
                    grad_x.addmm_(g, w.t() if fan else w)
            grad_x = grad_x.view(ctx.x_shape)
        a_needed = any(need[a] for _, _, pairs in _positions(ctx.spec) for a, _ in pairs)
        grad_A_cat = torch.mm(g_Z.t(), x2) if a_needed else None  # (R, in): every ∂A in one GEMM
        out, k = [], 0
        for g, (w_at, b_at, pairs), s_i, fan in zip(g2, _positions(ctx.spec), scalings, fan_in_fan_out):
            gw = (x2.t() @ g if fan else g.t() @ x2) if g is not None and need[w_at] else None
            gb = g.sum(0) if g is not None and need[b_at] else None
            out += [gw, gb]
            for (a_at, bb_at), s in zip(pairs, s_i):
                start, end = ctx.cols[k]
                out.append(grad_A_cat[start:end] if need[a_at] else None)
                out.append(torch.mm(g.t(), Z[:, start:end]).mul_(s) if g is not None and need[bb_at] else None)
                k += 1
        return (None, grad_x, *out)



def _compute_rows(group: SharedInputGroup, members: tuple, x: torch.Tensor, rows: list) -> list[torch.Tensor] | None:
    """Per-row batches (:func:`lorakit.per_row.per_row_adapters`): one gather of the members'
    stacked ``Aᵀ`` and one ``bmm`` for all of them, when every member has the same row slots."""
    if any(r is None for r in rows) or torch.is_grad_enabled():
        return None
    slots = rows[0][0]
    if any(r[0] is not slots for r in rows) or not all(_runnable(m, [], x) for m in members):
        return None
    A_rows = [r[1] for r in rows]
    if any(a.dtype != x.dtype or a.shape[0] != A_rows[0].shape[0] for a in A_rows):
        return None
    batch = x.shape[0]
    if slots.shape[0] != batch:
        return None  # the layer's own path raises the error for it
    A_cat = group.stacked_rows(A_rows)  # (slots, in, R)
    x3 = x.reshape(batch, -1, x.shape[-1])
    Z = torch.bmm(x3, A_cat.index_select(0, slots))  # (batch, tokens, R)
    outs, start = [], 0
    for m, (_, A_r, B_r) in zip(members, rows):
        out = m._base_forward(x)
        end = start + A_r.shape[-1]
        out.view(batch, -1, m.out_features).baddbmm_(Z[..., start:end], B_r.index_select(0, slots))
        outs.append(out)
        start = end
    return outs


# ---------------------------------------------------------------------- grouping


def group_shared_inputs(modules: dict[str, nn.Module]) -> list[SharedInputGroup]:
    """Group the LoRA linear layers of a model that may read one input: siblings (children
    of one module) of a layer kind with ``fuse_shared_input`` and the same ``in_features``.
    Every other such layer is left ungrouped; earlier groups are replaced.

    Args:
        modules: a walk of the model (:func:`lorakit.targets.walk`): path -> module.

    Returns:
        the groups made (each confirmed or dropped at run time, see :class:`SharedInputGroup`).
    """
    buckets: dict[tuple, list[nn.Module]] = {}
    for path, module in modules.items():
        if not isinstance(module, LoraLinear):
            continue
        module._group = None
        if getattr(module, "fuse_shared_input", False):
            parent = path.rpartition(".")[0]
            buckets.setdefault((parent, module.in_features), []).append(module)
    groups = []
    for members in buckets.values():
        if len(members) > 1:
            group = SharedInputGroup(members)
            for m in members:
                m._group = group
            groups.append(group)
    return groups


def ungroup(model: nn.Module) -> None:
    """Compute every layer on its own (the unfused path), until adapters are added or deleted."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module._group = None


def shared_input_groups(model: nn.Module) -> list[SharedInputGroup]:
    """The groups of ``model``'s layers, each once, in module order."""
    groups: dict[int, SharedInputGroup] = {}
    for module in model.modules():
        group = module.__dict__.get("_group")
        if group is not None:
            groups.setdefault(id(group), group)
    return list(groups.values())
