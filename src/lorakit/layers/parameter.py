"""LoRA on a bare ``nn.Parameter`` (PEFT's ``target_parameters``): fused mixture-of-experts
weights, or any weight a module uses without an ``nn.Linear``.

Seed 001 adapts a weight tensor with ``torch.nn.utils.parametrize``: while registered,
reading ``module.weight`` gives ``W + s·B·A``, so whatever the module computes with it is
adapted. Here the parametrization is registered on the module only while it runs
(:class:`ParameterHost` takes the module's place and wraps its forward), so the model's
parameters and state-dict keys stay the module's own at all other times.

Layouts, as PEFT 0.21 lays them out (its ``ParamWrapper``):

- a 2-D parameter ``(out, in)``: one adapter, ``A: (r, in)``, ``B: (out, r)``, ``ΔW = s·B·A``;
- a 3-D parameter of ``E`` experts, ``(E, out, in)`` (e.g. Mixtral's and Qwen3-MoE's fused
  ``gate_up_proj``, ``down_proj``), or ``(E, in, out)`` when the module says
  ``is_transposed = True`` (GPT-OSS): one rank-r adapter per expert, stored together as
  ``A: (E·r, in)`` with expert e's rows at ``e·r … e·r + r − 1`` and ``B: (out, E·r)`` with
  expert e's columns at ``e, e + E, e + 2E, …``; ``ΔW_e = s·B_e·A_e``.

Dropout and DoRA are refused (PEFT refuses them too: the input is not the layer's to drop
out, and the weight has no single output axis).

Per-row adapters: a parameter's update changes the module for every row it computes, so the
host runs once per distinct choice of adapters among the rows, on those rows' entries alone,
and puts the results back in place: exact for modules that treat their entries independently
(experts and routers do, token by token). The module's tensors must lead with the batch, or
with the batch's rows flattened with their tokens (``(batch·seq, ...)``, as a mixture-of-experts
block hands its experts the tokens); the cost grows with the number of distinct adapters.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorakit.dense import parameter_features
from lorakit.errors import LorakitError
from lorakit.inits import get_init
from lorakit.layers.adapter import LoraAdapter
from lorakit.layers.base import LoraLayer


class _Added(nn.Module):
    """The parametrization: ``W ↦ W + Σ_adapters s·lhs·rhs`` (``baddbmm`` for expert stacks)."""

    def __init__(self, layer: "LoraParameter", adapters: list):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule of the host
        self.adapters = adapters

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        for ad in self.adapters:
            lhs, rhs = self.layer.factors(ad, W.dtype)
            W = torch.baddbmm(W, lhs, rhs, alpha=ad.scaling) if W.dim() == 3 else torch.addmm(W, lhs, rhs, alpha=ad.scaling)
        return W


class LoraParameter(LoraLayer):
    """LoRA on parameter ``parameter_name`` of ``host`` (see the module docstring for layouts).

    The parameter is not registered here (its host holds it); ``self.weight`` is the very
    same ``Parameter``. Merging adds ``ΔW`` into it in place.

    Attributes:
        experts: E (1 for a 2-D parameter).
        transposed: a 3-D parameter is stored ``(E, in, out)``.
    """

    #: this layer does not take the place of a module: its host is a :class:`ParameterHost`
    in_place_of_module = False
    inits = ("gaussian", "kaiming", "random")

    def __init__(self, host: nn.Module, parameter_name: str):
        self.parameter_name = parameter_name
        super().__init__(host)
        self.experts, self.in_features, self.out_features, self.transposed = parameter_features(host, parameter_name)
        if not self.experts:
            raise LorakitError(f"LoRA on a parameter needs a 2-D (out, in) or 3-D (experts, out, in) parameter; "
                               f"{parameter_name} has shape {tuple(self.weight.shape)}")

    def _register_weight(self, base: nn.Module) -> None:
        object.__setattr__(self, "weight", getattr(base, self.parameter_name))

    # ------------------------------------------------------------------ layout

    def factors(self, ad, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``weight += s·lhs @ rhs`` (batched over experts for a 3-D parameter),
        in ``dtype`` (default: the factors' own)."""
        A, B = ad.A, ad.B
        if dtype is not None and A.dtype != dtype:
            A, B = A.to(dtype), B.to(dtype)
        if self.experts == 1 and self.weight.dim() == 2:
            return B, A
        E = self.experts
        A3 = A.view(E, -1, self.in_features)  # (E, r, in)
        B3 = B.view(self.out_features, -1, E).permute(2, 0, 1)  # (E, out, r)
        return (A3.transpose(1, 2), B3.transpose(1, 2)) if self.transposed else (B3, A3)

    @staticmethod
    def stacked(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's ``A_e: (r, in)`` and ``B_e: (out, r)`` as one adapter's ``A: (E·r, in)`` and
        ``B: (out, E·r)`` in the layout above (what :meth:`factors` reads back per expert)."""
        B = torch.stack(Bs, dim=2)  # (out, r, E): expert e's column j lands at j·E + e
        return torch.cat(As), B.reshape(B.shape[0], -1)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·B·A`` of adapter ``name`` in fp32, shaped as the parameter (per expert for a 3-D one)."""
        ad = self._adapter(name)
        lhs, rhs = self.factors(ad, torch.float32)
        return (lhs @ rhs) * ad.scaling

    def weight_out_in(self) -> torch.Tensor:
        if self.weight.dim() != 2:
            raise LorakitError(f"{self.parameter_name} is a stack of {self.experts} experts, not one (out, in) matrix")
        return self.weight

    def export_rank(self, name: str) -> int:
        return self._adapter(name).r

    # ------------------------------------------------------------------ adapters

    def new_adapter(self, r: int, alpha: float, scaling: float, dropout: float, *, dtype, device) -> LoraAdapter:
        if dropout:
            raise LorakitError(f"LoRA on the parameter {self.parameter_name} cannot use dropout (the module's input "
                               "is not the adapter's to drop out); set dropout to 0")
        adapter = LoraAdapter(self.in_features, self.out_features, r * self.experts, alpha, scaling,
                              dtype=dtype, device=device)
        adapter.r = r  # per expert; A holds E·r rows
        return adapter

    def init_adapter(self, adapter: LoraAdapter, init: str) -> None:
        """Each expert's ``(A_e, B_e)`` started by the registered init, as its own rank-r adapter."""
        if init not in self.inits:
            raise LorakitError(f"LoRA on a parameter starts with init {' or '.join(map(repr, self.inits))}, "
                               f"not {init!r}")
        r, E = adapter.r, self.experts
        for e in range(E):
            get_init(init)(adapter.A[e * r:(e + 1) * r], adapter.B[:, e::E], None, adapter.scaling)

    def _add_deltas(self, names: Iterable[str], sign: float) -> None:
        for name in names:
            ad = self.adapters[name]
            lhs, rhs = self.factors(ad, self.weight.dtype)
            if self.weight.dim() == 3:
                self.weight.baddbmm_(lhs, rhs, alpha=sign * ad.scaling)
            else:
                self.weight.addmm_(lhs, rhs, alpha=sign * ad.scaling)

    def row_stacks(self):
        """Each adapter's slot and an empty tensor on the weight's device: no stacks, since the
        host runs once per adapter chosen (:meth:`ParameterHost.forward`) rather than gathering."""
        self._slots = {name: slot for slot, name in enumerate(self.adapters, start=1)}
        return self._slots, self.weight.new_empty(0)

    def row_adapters(self) -> list[str | None]:
        """In per-row mode, the adapter of this parameter each row runs (None: none of its own)."""
        names = {slot: name for name, slot in self._slots.items()}
        return [names.get(slot) for slot in self._rows[0].tolist()]

    def parametrization(self, adapter: str | None = "") -> _Added | None:
        """What the host's forward registers on the parameter: the active adapters not merged (or,
        in per-row mode, ``adapter`` alone), or None for none."""
        if adapter != "":
            return _Added(self, [self.adapters[adapter]]) if adapter is not None else None
        return _Added(self, list(self._run)) if self._run else None

    def forward(self, *args, **kwargs):
        raise LorakitError("LoRA on a parameter runs inside its host module's forward, not on its own")

    def extra_repr(self) -> str:
        shape = "x".join(map(str, self.weight.shape))
        return f"parameter={self.parameter_name} ({shape}, experts={self.experts}), active={list(self.active)}"


class ParameterHost(nn.Module):
    """Takes the place of a module some of whose parameters carry LoRA.

    It registers the module's own parameters, buffers and children under their own names
    (the very same objects), so the model's state-dict keys do not change, and holds one
    :class:`LoraParameter` per adapted parameter in ``lora_parameters`` (in the module's
    parameter order). Its forward registers each one's parametrization on the module, runs
    the module, and removes them again.

    Raises:
        LorakitError: the module already has an attribute called ``lora_parameters``.
    """

    def __init__(self, host: nn.Module):
        super().__init__()
        if "lora_parameters" in host._modules or "lora_parameters" in host._parameters:
            raise LorakitError(f"{type(host).__name__} already has an attribute 'lora_parameters'; "
                               "lorakit cannot adapt its parameters")
        object.__setattr__(self, "_host", host)
        for name, param in host._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in host._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in host._non_persistent_buffers_set)
        for name, child in host._modules.items():
            self.add_module(name, child)
        self.lora_parameters = nn.ModuleDict()
        self.training = self.lora_parameters.training = host.training  # the mode of the module it stands for

    def adapt(self, parameter_name: str) -> LoraParameter:
        """The :class:`LoraParameter` of ``parameter_name``, made if new (kept in parameter order)."""
        if parameter_name not in self.lora_parameters:
            layers = dict(self.lora_parameters.items())
            layers[parameter_name] = LoraParameter(self._host, parameter_name)
            order = list(self._parameters)
            self.lora_parameters = nn.ModuleDict(sorted(layers.items(), key=lambda kv: order.index(kv[0])))
            self.lora_parameters.training = self.training
        return self.lora_parameters[parameter_name]

    def release(self, parameter_name: str) -> None:
        """Forget the :class:`LoraParameter` of ``parameter_name`` (it holds no adapter any more)."""
        del self.lora_parameters[parameter_name]

    def original(self) -> nn.Module:
        """The module itself, with this wrapper's (possibly moved) parameters and buffers put back
        (merged updates stay in them)."""
        host = self._synced()
        host.train(self.training)
        return host

    def _synced(self) -> nn.Module:
        """The module with this wrapper's parameters and buffers (``.to()`` may have replaced them
        here) in its own order (a parametrization removed re-registers its parameter last)."""
        host = self._host
        host._parameters.clear()
        host._parameters.update(self._parameters)
        host._buffers.update(self._buffers)
        return host

    def forward(self, *args, **kwargs):
        host = self._synced()
        host.training = self.training
        per_row = [(name, layer) for name, layer in self.lora_parameters.items() if layer._rows is not None]
        if per_row:
            return self._per_row(host, per_row, args, kwargs)
        return self._run(host, {name: layer.parametrization() for name, layer in self.lora_parameters.items()},
                         args, kwargs)

    def _per_row(self, host: nn.Module, layers: list, args: tuple, kwargs: dict):
        """The host run once per distinct choice of adapters among the rows, on their entries alone."""
        choices = list(zip(*(layer.row_adapters() for _, layer in layers)))  # per row: each parameter's adapter
        batch = len(choices)
        groups: dict[tuple, list[int]] = {}
        for row, choice in enumerate(choices):
            groups.setdefault(choice, []).append(row)

        def run(choice: tuple, call_args: tuple, call_kwargs: dict):
            return self._run(host, {name: layer.parametrization(adapter)
                                    for (name, layer), adapter in zip(layers, choice)}, call_args, call_kwargs)

        if len(groups) == 1:
            return run(choices[0], args, kwargs)
        leading = [a.shape[0] for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()]
        entries = next((n for n in leading if n % batch == 0), None)
        if entries is None:
            raise LorakitError(f"per-row adapters on the parameter(s) {[name for name, _ in layers]} need the module's "
                               f"inputs to lead with the batch of {batch} rows (or its rows' tokens); they lead with "
                               f"{leading}")
        per = entries // batch
        out = None
        for choice, rows in groups.items():
            index = (torch.tensor(rows)[:, None] * per + torch.arange(per)).reshape(-1)

            def pick(value):
                if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == entries:
                    return value.index_select(0, index.to(value.device))
                return value

            result = run(choice, tuple(map(pick, args)), {key: pick(value) for key, value in kwargs.items()})
            out = _put_back(out, result, index, entries)
        return out

    def _run(self, host: nn.Module, parametrizations: dict, args: tuple, kwargs: dict):
        """``host(*args, **kwargs)`` with ``parametrizations`` (parameter name -> :class:`_Added` or None) registered."""
        added = [(name, p) for name, p in parametrizations.items() if p is not None]
        if not added:
            return host(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for name, parametrization in added:
                requires_grad = getattr(host, name).requires_grad
                parametrize.register_parametrization(host, name, parametrization, unsafe=True)
                host.parametrizations[name].original.requires_grad_(requires_grad)
                stack.callback(parametrize.remove_parametrizations, host, name, leave_parametrized=False)
            stack.enter_context(parametrize.cached())
            return host(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{type(self._host).__name__} with LoRA on {list(self.lora_parameters)}"


def _put_back(out, result, index: torch.Tensor, entries: int):
    """``result`` of the entries at ``index`` written into ``out`` (made on first use), tensor by
    tensor through tuples; what does not lead with the entries is taken from the first group."""
    if isinstance(result, torch.Tensor) and result.dim() and result.shape[0] == index.numel():
        if out is None:
            out = result.new_zeros((entries, *result.shape[1:]))
        return out.index_copy_(0, index.to(result.device), result)
    if isinstance(result, (tuple, list)):
        parts = [_put_back(None if out is None else o, r, index, entries)
                 for o, r in zip(out if out is not None else [None] * len(result), result)]
        return type(result)(parts) if isinstance(result, list) else tuple(parts)
    return result if out is None else out
