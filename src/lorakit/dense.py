"""Which torch module types are dense layers and convolutions, and how each lays out its weight.

The one place that knows transformers' ``Conv1D`` (GPT-2): a dense layer whose weight is
stored ``(in_features, out_features)``, the transpose of ``nn.Linear``'s ``(out, in)``; and
the convolutions ``nn.Conv1d/2d/3d``, whose kernel ``(out, in, *kernel)`` is read as the
``(out, in·∏kernel)`` matrix it applies to each patch of the input; and which children of torch's
own modules their parent never calls (:data:`BYPASSED_CHILDREN`).
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
    """``(in_features, out_features)`` of a dense layer, read from its weight's layout (an
    ``nn.Linear`` subclass that packs its weight, bitsandbytes' 4-bit and 8-bit layers, is
    asked for its own features)."""
    if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a dense layer as ``(out_features, in_features)``: a view, Conv1D's transposed."""
    weight = module.weight.detach()
    return weight.T if is_conv1d(module) else weight


#: the convolutions LoRA adapts (as PEFT: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``); ``"all-linear"`` leaves them out
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv(module: nn.Module) -> bool:
    """True for an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (and their subclasses; not transposed ones)."""
    return isinstance(module, CONV_TYPES)


def conv_features(module: nn.Module) -> tuple[int, int]:
    """``(in_channels·∏kernel_size, out_channels)`` of a convolution with ``groups == 1``: the
    ``(in, out)`` of the matrix ``weight.view(out, -1)`` it applies to each input patch."""
    out_channels = module.weight.shape[0]
    return module.weight[0].numel(), out_channels


def parameter_features(host: nn.Module, name: str) -> tuple[int, int, int, bool]:
    """``(experts, in_features, out_features, transposed)`` of parameter ``name`` of ``host`` read as
    LoRA on a parameter reads it (PEFT's ``ParamWrapper``): a 2-D parameter is one ``(out, in)``
    matrix; a 3-D one is ``E`` experts ``(E, out, in)``, or ``(E, in, out)`` when the module says
    ``is_transposed = True`` (transformers' GPT-OSS experts). Other shapes give ``experts = 0``."""
    shape = getattr(host, name).shape
    if len(shape) == 2:
        return 1, shape[1], shape[0], False
    if len(shape) != 3:
        return 0, 0, 0, False
    transposed = bool(getattr(host, "is_transposed", False))
    return (shape[0], shape[1], shape[2], True) if transposed else (shape[0], shape[2], shape[1], False)


def adaptable_parameters(modules: dict[str, nn.Module], skip: tuple[type, ...] = ()) -> list[tuple[str, str]]:
    """``(module path, name)`` of each parameter that LoRA on parameters (PEFT's ``target_parameters``)
    is for, among ``modules`` (path -> module, in module order): a stack of ``E > 1`` experts (a
    mixture-of-experts block's fused ``gate_up_proj``, ``down_proj``) and the matrix of any other
    module (a router's ``weight``). Dense layers', convolutions' and embeddings' weights (LoRA on the
    module adapts those), biases and vectors are left out, and so are the parameters of the module
    types ``skip`` (:func:`lorakit.targets.adaptable_parameters` passes lorakit's own layers)."""
    return [(path, name) for path, module in modules.items()
            if path and not isinstance(module, (nn.Embedding, *LINEAR_TYPES, *CONV_TYPES, *skip))
            for name, param in module.named_parameters(recurse=False)
            if "bias" not in name and (param.dim() == 2 or (param.dim() == 3 and param.shape[0] > 1))]


#: parent type -> {child name: why the parent's forward never calls that child's forward}.
#: A LoRA layer there would do nothing, so explicit targets are refused and "all-linear"
#: leaves them out. Applies only while the parent type's own ``forward`` is in use.
BYPASSED_CHILDREN: dict[type, dict[str, str]] = {
    nn.MultiheadAttention: {
        "out_proj": "nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward "
                    "and never calls out_proj",
    },
    nn.TransformerEncoderLayer: {
        name: f"nn.TransformerEncoderLayer's eval-mode fast path (torch._transformer_encoder_layer_fwd) "
              f"reads {name}.weight directly and never calls {name}"
        for name in ("linear1", "linear2")
    },
}


def bypass_reason(modules: dict[str, nn.Module], path: str) -> str | None:
    """Why the parent of ``path`` never calls its forward (see :data:`BYPASSED_CHILDREN`), or None."""
    parent_path, _, child = path.rpartition(".")
    parent = modules.get(parent_path)
    for parent_type, children in BYPASSED_CHILDREN.items():
        if child in children and isinstance(parent, parent_type) and type(parent).forward is parent_type.forward:
            return children[child]
    return None
