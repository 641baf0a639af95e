"""What every LoRA layer shares: named adapters, the active set, merge and unmerge.

A concrete layer (:mod:`.linear`, :mod:`.embedding`) says only how its base runs and how ``ΔW = s·B·A``
is laid out against its weight; the bookkeeping lives here once.

The wrapped module keeps its parameters under their own names (``weight``, ``bias``: the very same
``Parameter`` objects), so a model's state-dict keys do not change; the original module object is kept
aside (not a submodule) and handed back, with those parameters, by :meth:`LoraLayer.base_layer`.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.inits import get_init, keep_initial_factors
from lorakit.layers.adapter import LoraAdapter
from lorakit.layers.quantized import is_quantized_linear


class LoraLayer(nn.Module):
    """Base of every wrapper: a frozen base module plus named adapters.

    Subclasses set ``in_features`` / ``out_features`` (the adapter's ``A: (r, in)``, ``B: (out, r)``) and
    implement :meth:`weight_to_layout` (how an ``(out, in)`` matrix lies in ``self.weight``), ``forward``
    and the per-row forward. A layer kind whose update has another form (AdaLoRA's ``P·diag(λ)·Q``,
    :mod:`.adalora`) overrides :meth:`new_adapter` and :meth:`init_adapter`; its adapters answer what a
    :class:`LoraAdapter` answers (``A``, ``B``, ``r``, ``alpha``, ``scaling``, ``dropout``, ``delta()``,
    ``export_factors()``, ``version()``), so forward, merge, per-row stacks and saving work on every kind.

    Attributes:
        adapters: ``nn.ModuleDict`` name -> adapter (a :class:`LoraAdapter`, or the kind's own).
        active: names the forward applies (several sum), in order.
        merged: names whose ``ΔW`` is currently inside ``weight``.
        disabled: when True the forward runs the base alone.
    """

    in_features: int
    out_features: int
    #: initialisers treat this layer as an embedding (A = 0, B random for gaussian/kaiming)
    is_embedding = False
    #: the layer kind (:data:`lorakit.layers.LAYER_KINDS`) this wrapper is registered under
    kind = "lora"
    #: other kinds whose adapters it holds beside its own (DoRA's layers: plain LoRA ones)
    hosts: tuple[str, ...] = ()
    #: the inits this kind can start an adapter with (None: every registered one)
    inits: tuple[str, ...] | None = None
    #: it takes its base module's place (False for LoRA on a parameter: a ``ParameterHost`` does)
    in_place_of_module = True
    #: its adapters may have a bias on B (PEFT's ``lora_bias``): dense and convolution layers, as in PEFT
    takes_lora_bias = False

    def __init__(self, base: nn.Module):
        super().__init__()
        object.__setattr__(self, "_base", base)  # kept aside: not a submodule, no duplicate keys
        self._quantized = is_quantized_linear(base)  # asked on every forward: found once
        self._register_weight(base)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.disabled = False
        self._run: list[LoraAdapter] = []  # what forward applies: active, not merged, not disabled
        self._premerge_weight: torch.Tensor | None = None
        self._premerge_bias: torch.Tensor | None = None
        self._rows = None  # (slots (batch,), A_rows, B_rows) while per_row_adapters is on
        self._stack_cache = None
        self.train(base.training)  # in the mode of the module it stands for (an eval model's dropout off)

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        """Whether this wrapper can take ``module``'s place (beyond its type: a grouped convolution cannot)."""
        return True

    def _register_weight(self, base: nn.Module) -> None:
        """Register the adapted weight under its own name (the very same ``Parameter``)."""
        self.weight = base.weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None or name.startswith("_") or name in ("weight", "bias"):
                raise
            return getattr(base, name)  # e.g. Conv1D.nf, Embedding.padding_idx

    def replace_base(self, new: nn.Module) -> None:
        """Compute the base with ``new`` from now on (a quantized copy of it, say), sharing its ``weight``."""
        object.__setattr__(self, "_base", new)
        self._quantized = is_quantized_linear(new)
        self.weight = new.weight

    @property
    def base_is_quantized(self) -> bool:
        """Whether the base keeps its weight quantized (:mod:`lorakit.layers.quantized`): it then
        computes its own output, and ΔW can be merged only by ``merge_and_unload``."""
        return self._quantized

    # ------------------------------------------------------------------ layout

    def weight_to_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` matrix laid out as ``self.weight`` (identity for nn.Linear)."""
        return matrix

    def as_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor in the layout of ``self.weight`` seen as ``(out_features, in_features)`` (a view)."""
        return self.weight_to_layout(tensor)  # transposes are their own inverse

    def weight_out_in(self) -> torch.Tensor:
        """``self.weight`` seen as ``(out_features, in_features)`` (a view, no copy)."""
        return self.as_out_in(self.weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·B·A`` of adapter ``name`` in fp32, in the layout (and shape) of ``self.weight``.

        Raises:
            LorakitError: this layer has no adapter ``name``.
        """
        return self.weight_to_layout(self._adapter(name).delta())

    def export_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name`` as the factors a plain LoRA file holds: ``A: (k, in)``, ``B: (out, k)``
        with ``ΔW = scaling·B·A`` (the adapter's own scaling). ``k`` is the adapter's rank, or
        fewer for a kind that prunes directions (AdaLoRA), 0 when none is left.

        Raises:
            LorakitError: this layer has no adapter ``name``.
        """
        return self._adapter(name).export_factors()

    def export_rank(self, name: str) -> int:
        """The rank adapter ``name`` has in a file: the rows of its exported A (LoRA on a parameter
        of E experts: the rank of each expert's adapter)."""
        return self.export_factors(name)[0].shape[0]

    def export_bias(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s bias on B, ``b: (out_features,)`` as a file holds it (the forward adds
        ``scaling·b``), or None when it has none (PEFT's ``lora_bias`` off)."""
        return getattr(self._adapter(name), "bias", None)

    def export_magnitude(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s DoRA magnitude vector ``m: (out_features,)``, or None for a kind without one."""
        self._adapter(name)
        return None

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                    init: str | None = "gaussian", bias: bool = False, kind: str | None = None) -> LoraAdapter:
        """Create adapter ``name`` and initialise it with the registered ``init``
        (None: leave A and B zero and the base weight untouched, e.g. to load them from a file).
        With ``bias`` B has a bias too (PEFT's ``lora_bias``), started at zero. ``kind``: the
        adapter's kind where it is one the layer :attr:`hosts` (None: the layer's own).

        Adapters live in fp32 when the base weight is fp16/bf16 (as PEFT does), else in
        the weight's dtype. An init that rewrites the base weight (pissa) does it here.

        Raises:
            LorakitError: ``name`` exists already, or the layer is merged.
        """
        if name in self.adapters:
            raise LorakitError(f"adapter {name!r} exists already on this layer; delete it or pick another name")
        if self.merged:
            raise LorakitError("cannot add an adapter to a merged layer; unmerge first")
        if bias and not self.takes_lora_bias:
            raise LorakitError(f"{type(self).__name__} adapters have no bias on B (lora_bias is for linear and "
                               "convolution layers, as in PEFT); set lora_bias=False")
        wdtype = self.weight.dtype
        dtype = torch.float32 if wdtype in (torch.float16, torch.bfloat16) or not wdtype.is_floating_point else wdtype
        extra = {"bias": True} if bias else {"kind": kind} if kind not in (None, self.kind) else {}
        adapter = self.new_adapter(r, alpha, scaling, dropout, dtype=dtype, device=self.weight.device, **extra)
        if init is not None:
            with torch.no_grad():
                self.init_adapter(adapter, init)
        self.adapters[name] = adapter.train(self.training)
        self._refresh()
        return adapter

    def new_adapter(self, r: int, alpha: float, scaling: float, dropout: float, *, dtype, device,
                    bias: bool = False) -> nn.Module:
        """A zero adapter of this layer's kind (a :class:`LoraAdapter` here)."""
        return LoraAdapter(self.in_features, self.out_features, r, alpha, scaling, dropout, bias=bias,
                           dtype=dtype, device=device)

    def init_adapter(self, adapter: nn.Module, init: str) -> None:
        """Start ``adapter``'s factors with the registered init ``init`` (under no_grad);
        an init that rewrites the base weight (pissa) does it here."""
        residual = get_init(init)(adapter.A, adapter.B, self.weight_out_in().float(), adapter.scaling,
                                  embedding=self.is_embedding)
        if residual is not None:
            self.weight.copy_(self.weight_to_layout(residual).to(self.weight.dtype))
            keep_initial_factors(adapter)  # so the saved adapter can apply to the original W

    def rewrapped(self, wrapper: type[LoraLayer], check_only: bool = False) -> LoraLayer | None:
        """This layer as a ``wrapper`` whose kind :attr:`hosts` this one's (LoRA's as DoRA's, for a DoRA
        adapter to join): the same base and the very same adapters, active as they were.

        Raises:
            LorakitError: an adapter here has what ``wrapper`` does not compute (a bias on B, an activation).
        """
        if odd := [n for n, ad in self.adapters.items() if getattr(ad, "bias", None) is not None or ad.activation]:
            raise LorakitError(f"{wrapper.kind} adapters cannot join adapters {odd} here, whose bias on B or "
                               "activation they do not compute; delete those first")
        if check_only:
            return None
        layer = wrapper(self._base)
        layer.adapters = self.adapters
        layer.active, layer.disabled = self.active, self.disabled
        layer._refresh()
        return layer

    def own_kind(self) -> list[str]:
        """The adapters of this layer's own :attr:`kind` (not of a kind it :attr:`hosts`)."""
        return list(self.adapters)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging first if it is merged)."""
        self._adapter(name)
        if name in self.merged:
            self.unmerge()
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)
        self._refresh()

    def set_active(self, names: Iterable[str]) -> None:
        """Make ``names`` the adapters the forward sums; names this layer lacks are skipped."""
        self.active = tuple(n for n in names if n in self.adapters)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = bool(disabled)
        self._refresh()

    def _adapter(self, name: str) -> LoraAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise LorakitError(f"this layer has no adapter {name!r}; it has {sorted(self.adapters)}") from None

    def _refresh(self) -> None:
        self._run = [] if self.disabled else [self.adapters[n] for n in self.active if n not in self.merged]

    # ------------------------------------------------------------------ merge

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Add ``ΔW`` of ``names`` (default: the active adapters) into ``weight``.

        ``ΔW`` is computed and added in fp32, then cast back to the weight's dtype. For a
        fp16/bf16 weight the original weight is kept (one more copy of the weight, 2 bytes
        per element, while merged) so that :meth:`unmerge` restores it bit for bit; a fp32
        weight keeps nothing extra and unmerge subtracts ``ΔW`` (exact to ~1e-7).
        Merging an adapter that is already merged warns and does nothing. An adapter's bias on B
        (``lora_bias``) is added into the layer's bias the same way.

        Raises:
            LorakitError: an unknown adapter name, the base weight is quantized, or an adapter
                has a bias on B and the layer has no bias to hold it.
        """
        if self.base_is_quantized:
            raise LorakitError("this layer's base weight is quantized and cannot hold ΔW in place; "
                               "merge_and_unload(model) dequantizes and merges it")
        names = list(self.active if names is None else names)
        todo = []
        for name in names:
            self._adapter(name)
            if name in self.merged:
                warnings.warn(f"adapter {name!r} is already merged; merging it again does nothing", stacklevel=3)
            elif name not in todo:
                todo.append(name)
        if not todo:
            return
        biased = self.biased(todo)
        with torch.no_grad():
            w = self.weight
            if w.dtype != torch.float32 and w.dtype != torch.float64:
                if self._premerge_weight is None:
                    self._premerge_weight = w.detach().clone()
                if biased and self._premerge_bias is None:
                    self._premerge_bias = self.bias.detach().clone()
            self._merge_weight(todo)
            if biased:
                self.bias.copy_(self.merged_bias(biased).to(self.bias.dtype))
        self.merged = self.merged + tuple(todo)
        self._refresh()

    def _merge_weight(self, names: list[str]) -> None:
        """Add the ``ΔW`` of ``names`` (none of them merged yet) into ``weight``, under no_grad.
        A kind whose update depends on W itself (DoRA) overrides this and :meth:`_unmerge_weight`."""
        w = self.weight
        if w.dtype in (torch.float32, torch.float64):
            self._add_deltas(names, 1.0)
        else:
            delta = sum(self.delta_weight(n) for n in names)
            w.copy_((w.float() + delta).to(w.dtype))

    def unmerge(self) -> None:
        """Take every merged ``ΔW`` out of ``weight`` again (see :meth:`merge` for exactness)."""
        if not self.merged:
            return
        with torch.no_grad():
            if self._premerge_weight is not None:
                self.weight.copy_(self._premerge_weight)
                self._premerge_weight = None
            else:
                self._unmerge_weight()
            if self._premerge_bias is not None:
                self.bias.copy_(self._premerge_bias)
                self._premerge_bias = None
            else:
                for name in self.biased(self.merged):
                    ad = self.adapters[name]
                    self.bias.sub_(ad.bias.to(self.bias.dtype), alpha=ad.scaling)
        self.merged = ()
        self._refresh()

    def biased(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose adapter has a bias on B (checked: the layer has a bias to merge it into)."""
        biased = [n for n in names if getattr(self.adapters[n], "bias", None) is not None]
        if biased and getattr(self, "bias", None) is None:
            raise LorakitError(f"adapter {biased[0]!r} has a bias on B (lora_bias) but this layer has no bias to "
                               "merge it into (as in PEFT); keep the adapter unmerged")
        return biased

    def merged_bias(self, names: Iterable[str]) -> torch.Tensor | None:
        """The layer's bias with the bias on B of adapters ``names`` added (``b₀ + Σ s·b``, fp32), or
        the bias itself when none of them has one (None when the layer has none).

        Raises:
            LorakitError: an adapter has a bias on B and the layer has none.
        """
        biased = self.biased(list(names))
        if not biased:
            return getattr(self, "bias", None)
        out = self.bias.detach().float().clone()
        for name in biased:
            ad = self.adapters[name]
            out.add_(ad.bias.detach().float(), alpha=ad.scaling)
        return out

    def _unmerge_weight(self) -> None:
        """Take the ``ΔW`` of every merged adapter out of a fp32/fp64 ``weight`` (no copy was kept)."""
        self._add_deltas(self.merged, -1.0)

    def _add_deltas(self, names: Iterable[str], sign: float) -> None:
        """``W += sign · s·B·A`` for each adapter in ``names``, in place (a fp32/fp64 weight):
        one ``addmm_`` each, so no ``(out, in)`` temporary is allocated (the same ΔW as
        :meth:`delta_weight`, to rounding)."""
        w = self.weight_out_in()  # a view: transposed for Conv1D and embeddings
        for name in names:
            ad = self.adapters[name]
            w.addmm_(ad.B.to(w.dtype), ad.A.to(w.dtype), alpha=sign * ad.scaling)

    def base_layer(self) -> nn.Module:
        """The original module (its own type: nn.Linear, Conv1D, nn.Embedding) sharing
        ``weight`` and ``bias`` with this layer; merged ``ΔW`` stays in the weight."""
        base = self._base
        for pname, param in self._parameters.items():
            setattr(base, pname, param)
        base.train(self.training)
        return base

    # ------------------------------------------------------------------ per-row stacks

    def row_stacks(self) -> tuple:
        """All adapters of this layer stacked for a per-row batch (:mod:`lorakit.layers.stacks`).

        Returns:
            ``(slots, A_rows, B_rows)``: ``slots[name]`` is adapter ``name``'s slot (>= 1);
            slot 0 is zeros (the base alone). ``A_rows: (slots, in, r_max)`` holds ``Aᵀ``
            (for an embedding: a lookup table per slot), ``B_rows: (slots, r_max, out)``
            holds ``(s·B)ᵀ``, scaling folded in; smaller ranks are zero-padded. Kept up to
            date slot by slot: adding, deleting or changing one adapter rewrites its slot
            alone. Memory: one more copy of this layer's adapters (up to twice, as the
            stack grows by doubling). A kind that scales whole outputs per adapter (DoRA) adds
            ``S_rows: (slots, out)``, and its per-row forward reads it.
        """
        if self._stack_cache is None:
            self._stack_cache = self._new_stacks()
        return self._stack_cache.update(self.adapters)

    def _new_stacks(self):
        """This layer's :class:`~lorakit.layers.stacks.RowStacks` (DoRA adds its per-row scale)."""
        from lorakit.layers.stacks import RowStacks

        return RowStacks(self.in_features, self.out_features)

    def set_rows(self, rows) -> None:
        """Per-row mode: ``rows = (slots: (batch,) long, *stacks)`` with the stacks of
        :meth:`row_stacks`, or None to leave it.

        Raises:
            LorakitError: an adapter of this layer is merged (its ΔW would count twice).
        """
        if rows is not None and self.merged:
            raise LorakitError(f"adapters {list(self.merged)} are merged; unmerge before per-row adapters")
        self._rows = rows
