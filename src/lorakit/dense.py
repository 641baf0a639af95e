"""Which torch module types are dense layers, and how each lays out its weight.

The one place that knows transformers' ``Conv1D`` (GPT-2): a dense layer whose weight is
stored ``(in_features, out_features)``, the transpose of ``nn.Linear``'s ``(out, in)``.
It sits at the bottom of the package (torch and transformers only) so that
:mod:`lorakit.layers` can ask it too; everything above asks :mod:`lorakit.targets`,
which re-exports these names with the rest of what lorakit knows about a model's structure.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers is a dependency, but a dense layer is still an nn.Linear without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

#: the dense layer types: what ``"all-linear"`` selects and what analyses read as ``(out, in)``
LINEAR_TYPES: tuple[type, ...] = tuple(t for t in (nn.Linear, Conv1D) if t is not None)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight ``(in, out)``, PEFT's ``fan_in_fan_out``)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` or a ``Conv1D`` (and their subclasses)."""
    return isinstance(module, LINEAR_TYPES)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a dense layer, read from its weight's layout."""
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a dense layer as ``(out_features, in_features)``: a view, Conv1D's transposed."""
    weight = module.weight.detach()
    return weight.T if is_conv1d(module) else weight
