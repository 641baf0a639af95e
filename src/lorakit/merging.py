"""Merge adapters into the base weights and take them out again; unload lorakit from a model.

After training, ``ΔW = s·B·A`` can be added into ``W`` so inference costs nothing extra
(LoRA §4.1). :func:`merge` / :func:`unmerge` do it in place and reversibly;
:func:`merge_and_unload` and :func:`unload` hand back the plain model with its original
module types. The per-layer arithmetic (fp32 ΔW, bit-exact unmerge for fp16/bf16) is
:meth:`lorakit.layers.LoraLayer.merge`.
"""

from __future__ import annotations

import warnings
from typing import Iterable

from torch import nn

from lorakit.adapter_records import active_adapters, check_names, forget_adapters
from lorakit.alora import activations
from lorakit.errors import LorakitError
from lorakit.layers import LoraLayer, ParameterHost, SavedModule
from lorakit.quantize import MergeRounding, merged_base
from lorakit.targets import replace_module, tied_paths, walk


def merge(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Add ``ΔW`` of ``names`` (default: the active adapters) into the base weights.

    See :meth:`lorakit.layers.LoraLayer.merge` for precision and memory: ΔW in fp32;
    fp16/bf16 weights keep their original copy while merged so unmerge is bit-exact.
    Merging an adapter twice warns once and does nothing.

    Raises:
        LorakitError: an adapter name the model does not have.
    """
    names = tuple(active_adapters(model) if names is None else names)
    check_names(model, names)
    modules = walk(model)
    layers = {p: m for p, m in modules.items() if isinstance(m, LoraLayer)}
    again = [n for n in names if any(n in layer.merged for layer in layers.values())]
    if again:
        warnings.warn(f"adapter(s) {again} already merged; merging again does nothing", stacklevel=2)
    todo = [n for n in names if n not in again]
    _check_activated(model, todo)
    tied = tied_paths(modules, [p for p, layer in layers.items() if any(n in layer.adapters for n in todo)])
    if tied:
        warnings.warn(f"merging into {tied}, whose weight is tied to another module (e.g. the output head): "
                      "that module changes too; keep such adapters unmerged", stacklevel=2)
    _check_biases(layers.values(), todo)
    for layer in layers.values():
        mine = [n for n in todo if n in layer.adapters]
        if mine:
            layer.merge(mine)


def _check_activated(model: nn.Module, names) -> None:
    """Refuse merging an activated adapter (alora_invocation_tokens): merged, it would apply before
    its invocation too (PEFT refuses it as well)."""
    if activated := [n for n in names if n in activations(model)]:
        raise LorakitError(f"adapter {activated[0]!r} is an activated LoRA (alora_invocation_tokens): it applies only "
                           "from its invocation tokens on, which a merged weight cannot do; keep it unmerged")


def _check_biases(layers, names) -> None:
    """Refuse, before any layer changes, a merge of a bias on B (lora_bias) into a layer without a bias."""
    for layer in layers:
        layer.biased([n for n in names if n in layer.adapters])


def unmerge(model: nn.Module) -> None:
    """Take every merged ``ΔW`` out of the base weights again."""
    for module in walk(model).values():
        if isinstance(module, LoraLayer):
            module.unmerge()


def _unwrap(model: nn.Module, *, keep_merged: bool) -> nn.Module:
    modules = walk(model)
    for path, module in list(modules.items()):
        if isinstance(module, LoraLayer):
            if not keep_merged:
                module.unmerge()
            if module.in_place_of_module:
                replace_module(model, modules, path, module.base_layer())
        elif isinstance(module, ParameterHost):  # its LoRA parameters come next in the walk
            replace_module(model, modules, path, module.original())
        elif isinstance(module, SavedModule):
            replace_module(model, modules, path, module.unwrapped(keep_merged))
    forget_adapters(model)
    return model


def merge_and_unload(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Merge the active adapters and return the plain model (original module types).

    modules_to_save modules are replaced by the active adapter's trained copy.

    A LoRA layer on a quantized base (:mod:`lorakit.quantize`, bitsandbytes) is dequantized,
    merged in fp32 and kept in the dtype the base computes in (bf16 for a base quantized from
    bf16), or quantized again with ``requantize``; a :class:`QuantizedMergeWarning` says how
    much rounding that introduced.

    Returns:
        ``model`` itself, with no lorakit module left in it.
    """
    _check_activated(model, active_adapters(model))
    _check_biases([m for m in walk(model).values() if isinstance(m, LoraLayer)], active_adapters(model))
    _merge_quantized(model, requantize)
    layers = [m for m in walk(model).values() if isinstance(m, LoraLayer)]
    pending = [n for n in active_adapters(model)
               if any(n in layer.adapters and n not in layer.merged for layer in layers)]
    if pending:
        _untie(model, pending)
        merge(model, pending)
    return _unwrap(model, keep_merged=True)


def _untie(model: nn.Module, names) -> None:
    """Give each layer about to merge ``names`` whose weight another module shares (an input embedding tied
    to the output head) a weight of its own, and the model's config untied embeddings: the head keeps the
    weight it computes with unmerged, so the merged model answers as the adapter did (merging into the
    shared weight would move the head too)."""
    modules = walk(model)
    layers = {p: m for p, m in modules.items() if isinstance(m, LoraLayer)}
    tied = tied_paths(modules, [p for p, layer in layers.items() if any(n in layer.adapters for n in names)])
    for path in tied:
        layers[path].weight = nn.Parameter(layers[path].weight.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    for config in (config, getattr(config, "get_text_config", lambda: None)()) if tied else ():
        if getattr(config, "tie_word_embeddings", False):  # a model config (or its text part) untied
            config.tie_word_embeddings = False


class QuantizedMergeWarning(UserWarning):
    """A merge into a quantized base rounded the merged weights (the message says how much)."""


def _merge_quantized(model: nn.Module, requantize: bool) -> None:
    """Replace each LoRA layer on a quantized base by a base holding its merged weight."""
    modules = walk(model)
    names = active_adapters(model)
    rounding = MergeRounding()
    for path, layer in list(modules.items()):
        if isinstance(layer, LoraLayer) and layer.base_is_quantized:
            mine = [n for n in names if n in layer.adapters]
            replace_module(model, modules, path, merged_base(layer, mine, rounding, requantize) if mine
                           else layer.base_layer())
    if rounding.layers:
        warnings.warn(rounding.describe(), QuantizedMergeWarning, stacklevel=3)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (merged ones are unmerged): the original model back."""
    return _unwrap(model, keep_merged=False)
