"""LoRA layer types, one file each, and the registry that maps a layer kind and a base
module type to its wrapper.

Kinds: ``"lora"`` (``ΔW = s·B·A``: :class:`LoraLinear`, :class:`LoraEmbedding`,
:class:`LoraConv`), ``"dora"`` (``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖``: :class:`DoraLinear`,
:class:`DoraEmbedding`, :class:`DoraConv`) and ``"adalora"`` (``ΔW = s·P·diag(λ)·Q``:
:class:`AdaLoraLinear`). Every wrapper is a :class:`LoraLayer`, so merging, per-row
batches, saving and analysis see all kinds alike. LoRA on a bare parameter
(:class:`LoraParameter`, held by a :class:`ParameterHost` in its module's place) is chosen by
parameter name, not by module type, so it is not in the registry.

>>> wrapper_for(nn.Linear(4, 4)) is LoraLinear
True
>>> wrapper_for(nn.Conv2d(3, 4, 3), "dora") is DoraConv
True
"""

from __future__ import annotations

from torch import nn

from lorakit.dense import CONV_TYPES, LINEAR_TYPES, Conv1D
from lorakit.errors import LorakitError
from lorakit.layers.adalora import AdaLoraAdapter, AdaLoraLinear
from lorakit.layers.adapter import LoraAdapter
from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import LoraConv
from lorakit.layers.dora import DoraAdapter
from lorakit.layers.dora_layers import DoraConv, DoraEmbedding, DoraLinear
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear
from lorakit.layers.parameter import LoraParameter, ParameterHost
from lorakit.layers.saved import SavedModule
from lorakit.layers.tokens import TokenPatch, TokenRows

#: layer kind -> {base module type -> wrapper class}; add one with :func:`register_layer`.
LAYER_KINDS: dict[str, dict[type, type[LoraLayer]]] = {}


def register_layer(base_type: type, wrapper: type[LoraLayer]) -> None:
    """Wrap modules of ``base_type`` (and its subclasses) with ``wrapper`` when an adapter
    of ``wrapper.kind`` is added."""
    LAYER_KINDS.setdefault(wrapper.kind, {})[base_type] = wrapper


register_layer(nn.Linear, LoraLinear)
register_layer(nn.Embedding, LoraEmbedding)
register_layer(nn.Linear, AdaLoraLinear)
register_layer(nn.Linear, DoraLinear)
register_layer(nn.Embedding, DoraEmbedding)
for _conv in CONV_TYPES:
    register_layer(_conv, LoraConv)
    register_layer(_conv, DoraConv)
if Conv1D is not None:
    register_layer(Conv1D, LoraLinear)
    register_layer(Conv1D, AdaLoraLinear)
    register_layer(Conv1D, DoraLinear)


def wrapper_for(module: nn.Module, kind: str = "lora") -> type[LoraLayer] | None:
    """The wrapper class of layer kind ``kind`` for ``module``, or None when that kind cannot wrap it
    (its type is not registered, or the wrapper refuses it: a convolution with ``groups > 1``).

    Raises:
        LorakitError: ``kind`` is not a registered layer kind.
    """
    types = LAYER_KINDS.get(kind)
    if types is None:
        raise LorakitError(f"layer kind {kind!r} is unknown; choose one of {sorted(LAYER_KINDS)}")
    wrapper = types.get(type(module))
    if wrapper is None:
        wrapper = next((w for base_type, w in types.items() if isinstance(module, base_type)), None)
    return wrapper if wrapper is not None and wrapper.wraps(module) else None


__all__ = ["AdaLoraAdapter", "AdaLoraLinear", "DoraAdapter", "DoraConv", "DoraEmbedding", "DoraLinear", "LAYER_KINDS",
           "LINEAR_TYPES", "LoraAdapter", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraParameter",
           "ParameterHost", "SavedModule", "TokenPatch", "TokenRows", "register_layer", "wrapper_for"]
