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
- backward (one autograd node for the group, in :mod:`lorakit.layers.fused_ops`):
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

Under autocast every tensor is cast to the compute dtype first, as autocast would for each
product (the casts are recorded, so fp32 factors get fp32 gradients). It does not apply (the
members run on their own, exactly as without groups) under ``torch.compile`` (the compiler
sees the plain layers), with LoRA dropout (each adapter draws its own mask), with mixed
dtypes outside autocast, per-row batches under autocast, on a layer kind or adapter that
does not set ``fuse_shared_input = True`` (AdaLoRA's adapters do not; DoRA can set it
False), on a base weight or factor that is not a plain dense tensor (a quantized base, an
FSDP-sharded ``DTensor``), and when all members are merged or disabled. Per-row batches
(:func:`lorakit.per_row.per_row_adapters`) are computed together when every member has the
same row slots: one gather of the members' stacked ``Aᵀ`` and one ``bmm``.

Cost: the members' plan (which tensors, which scalings) is read once and kept while no
member's active set or parameter object changes, so a call adds a few attribute reads; the
first member holds the others' outputs only until they are called.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch import nn

from lorakit.layers.fused_ops import Plan, autocast_dtype, runnable
from lorakit.layers.linear import LoraLinear

__all__ = ["SharedInputGroup", "group_shared_inputs", "settle", "shared_input_groups", "ungroup"]

_PROBING, _FUSED, _OFF = "probing", "fused", "off"


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
        self._plan: Plan | None = None
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

    def idle(self) -> bool:
        """Whether no member has an adapter to run (all merged, disabled or none active): each
        then computes its base alone, without the group's bookkeeping."""
        for m in self.members:
            if m._run or m._rows is not None:
                return False
        return True

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output when the group computes it, else None (the layer runs on its own)."""
        if torch.compiler.is_compiling():
            return None
        # A block recomputed in the backward (activation checkpointing) must save what its
        # forward saved: nothing is learnt there, so it runs as it ran then.
        if self.state is _PROBING and (torch._C._current_autograd_node() is not None or not self._probe(layer, x)):
            return None
        if self.state is _FUSED:
            return self._lead(x) if layer is self.leader else self._follow(layer, x)
        return None

    def _probe(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Note who reads what in the first pass; True once the pass is over (decided)."""
        if any(m is layer for m in self._seen):  # called again: the probing pass is over
            if self._same:
                self.state, self.leader, self.followers = _FUSED, self._first[0], tuple(self._same)
            else:
                self.state = _OFF
            self._first, self._same, self._seen = None, [], []
            return True
        self._seen.append(layer)
        if self._first is None:
            self._first = (layer, weakref.ref(x))
        elif self._first[1]() is x:
            self._same.append(layer)
        return False

    def _turn_off(self) -> None:
        self.state = _OFF
        self._plan = self._rows_cache = None
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
        cast = autocast_dtype(x)
        if members[0]._rows is not None:
            outs = None if cast is not None else self._rows_forward(members, x)
        else:
            plan = self._plan
            if plan is None or not plan.valid(members, x, cast):
                plan = self._plan = Plan(members, x, cast)
            outs = plan.forward(x) if plan.ok else None
        if outs is None:
            return None
        self.fused_calls += 1
        self._pending = dict(zip(self.followers, outs[1:]))
        self._pending_x, self._pending_grad = x, torch.is_grad_enabled()
        self._pending_version = None if x.is_inference() else x._version
        return outs[0]

    # ------------------------------------------------------------------ per-row batches

    def _rows_forward(self, members: tuple, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Per-row batches (:func:`lorakit.per_row.per_row_adapters`): one gather of the members'
        stacked ``Aᵀ`` and one ``bmm`` for all of them, when every member has the same row slots."""
        rows = [m._rows for m in members]
        if any(r is None or len(r) != 3 for r in rows) or torch.is_grad_enabled() or any(
                m.row_gate is not None for m in members):  # (rows of activated adapters: each layer masks its own)
            return None  # (a 4th stack: DoRA's scales or biases on B, which each layer adds itself)
        slots = rows[0][0]
        if slots.shape[0] != x.shape[0] or any(r[0] is not slots for r in rows):
            return None  # (a wrong batch size: the layer's own path says so)
        if not all(runnable(m, (), x) and r[1].dtype == x.dtype and r[1].shape[0] == rows[0][1].shape[0]
                   for m, r in zip(members, rows)):
            return None
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, x.shape[-1])
        Z = torch.bmm(x3, self._stacked_rows([r[1] for r in rows]).index_select(0, slots))  # (batch, tokens, R)
        outs, start = [], 0
        for m, (_, A_rows, B_rows) in zip(members, rows):
            out = m._base_forward(x)
            end = start + A_rows.shape[-1]
            out.view(batch, -1, m.out_features).baddbmm_(Z[..., start:end], B_rows.index_select(0, slots))
            outs.append(out)
            start = end
        return outs

    def _stacked_rows(self, A_rows: list[torch.Tensor]) -> torch.Tensor:
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


def settle(model: nn.Module, forward: Callable[[], object]) -> None:
    """Run ``forward`` (a forward pass of ``model`` without gradient, e.g. on one example) twice
    when a group of ``model`` is still probing, so that every group has decided before the
    passes that count: a training run resumed from a checkpoint then computes every step as
    the run it continues did (the probing pass computes the members on their own, which rounds
    differently)."""
    if any(g.state == _PROBING for g in shared_input_groups(model)):
        forward()
        forward()


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
