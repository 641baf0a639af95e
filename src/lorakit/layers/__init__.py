"""LoRA layer types, one file each, and the registry that maps a base module type to its wrapper.

>>> wrapper_for(nn.Linear(4, 4)) is LoraLinear
True
"""

from __future__ import annotations

from torch import nn

from lorakit.dense import LINEAR_TYPES, Conv1D
from lorakit.layers.base import LoraAdapter, LoraLayer
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear
from lorakit.layers.saved import SavedModule

#: base module type -> LoRA wrapper class; add a type with :func:`register_layer`.
LAYER_TYPES: dict[type, type[LoraLayer]] = {}


def register_layer(base_type: type, wrapper: type[LoraLayer]) -> None:
    """Wrap modules of ``base_type`` (and its subclasses) with ``wrapper``."""
    LAYER_TYPES[base_type] = wrapper


register_layer(nn.Linear, LoraLinear)
register_layer(nn.Embedding, LoraEmbedding)
if Conv1D is not None:
    register_layer(Conv1D, LoraLinear)


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA wrapper class for ``module``, or None when lorakit cannot wrap it."""
    wrapper = LAYER_TYPES.get(type(module))
    if wrapper is not None:
        return wrapper
    for base_type, wrapper in LAYER_TYPES.items():
        if isinstance(module, base_type):
            return wrapper
    return None


__all__ = ["LAYER_TYPES", "LINEAR_TYPES", "LoraAdapter", "LoraEmbedding", "LoraLayer", "LoraLinear",
           "SavedModule", "register_layer", "wrapper_for"]
