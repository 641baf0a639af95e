"""Attach LoRA adapters to any ``torch.nn.Module`` and keep track of them: add, switch, delete.

``attach`` swaps the target modules in place for LoRA wrappers (the module paths and
state-dict keys of the user's model do not change), freezes every other parameter and
remembers each adapter's :class:`~lorakit.config.LoraConfig` on the model. Several
named adapters share one base model; ``set_active`` picks which ones the forward sums.

Which modules a config selects lives in :mod:`lorakit.targets`, merging and unloading in
:mod:`lorakit.merging`, weighted combination in :mod:`lorakit.combination`, per-row
selection in :mod:`lorakit.per_row`. Their public names are importable from here too.

Each operation walks the model's modules once (:func:`lorakit.targets.walk`), so loading
an adapter costs the same however many adapters are already on the model.

>>> model = attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> print(trainable_report(model))
trainable params: 73,728 || all params: 22,786,944 || trainable%: 0.3236
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from importlib import import_module
from typing import Callable, Iterable

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inits import REWRITES_WEIGHT
from lorakit.layers import LoraLayer, SavedModule, wrapper_for
from lorakit.targets import (  # noqa: F401  (re-exported: lorakit.model is where users look)
    DEFAULT_TARGETS, lora_layers, replace_module, saved_modules, saved_paths, target_paths, targetable_modules, walk,
)


_CONFIGS = "_lora_configs"  # model attribute: {adapter name: LoraConfig}, replaced (not mutated) on add/delete
_ACTIVE = "_lora_active"  # model attribute: tuple of active adapter names

# names defined in lorakit.merging (which imports this module), handed out lazily by __getattr__
_MERGING = ("merge", "unmerge", "merge_and_unload", "unload")


def __getattr__(name: str):
    if name in _MERGING:
        return getattr(import_module("lorakit.merging"), name)
    raise AttributeError(f"module 'lorakit.model' has no attribute {name!r}")


# ---------------------------------------------------------------------- adapters on a model


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config each adapter on ``model`` was made with, by adapter name (a copy of the dict)."""
    return dict(getattr(model, _CONFIGS, {}))


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters the forward currently sums."""
    return tuple(getattr(model, _ACTIVE, ()))


def base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's own parameters (shared ones once), without any adapter's A and B or
    modules_to_save copy: the ones :func:`add_adapter` freezes."""
    seen: dict[int, nn.Parameter] = {}
    for module in walk(model).values():
        for param in module._parameters.values():
            if param is not None:
                seen.setdefault(id(param), param)
    return list(seen.values())


def check_names(model: nn.Module, names: Iterable[str]) -> None:
    """Raise a LorakitError naming every one of ``names`` the model has no adapter for."""
    configs = getattr(model, _CONFIGS, {})
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise LorakitError(f"unknown adapter(s) {unknown}; the model has {sorted(configs) or 'none'}")


def tied_paths(modules: dict[str, nn.Module], paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` whose weight another module shares (e.g. GPT-2's wte / lm_head).

    Args:
        modules: a :func:`lorakit.targets.walk` of the model.
    """
    uses = Counter(id(p) for m in modules.values() for p in m._parameters.values() if p is not None)
    return [p for p in paths if uses[id(modules[p].weight)] > 1]


# ---------------------------------------------------------------------- bias modes
# fn(modules of a walk) -> None: makes the biases that train trainable.

def _bias_none(modules: dict[str, nn.Module]) -> None:
    return None


def _bias_all(modules: dict[str, nn.Module]) -> None:
    for module in modules.values():
        bias = module._parameters.get("bias")
        if bias is not None:
            bias.requires_grad_(True)


def _bias_lora_only(modules: dict[str, nn.Module]) -> None:
    for module in modules.values():
        bias = module._parameters.get("bias") if isinstance(module, LoraLayer) else None
        if bias is not None:
            bias.requires_grad_(True)


#: LoraConfig.bias -> which biases train
BIAS_MODES: dict[str, Callable[[dict[str, nn.Module]], None]] = {
    "none": _bias_none, "all": _bias_all, "lora_only": _bias_lora_only,
}


# ---------------------------------------------------------------------- attach


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *,
                init_weights: bool = True) -> nn.Module:
    """Add adapter ``name`` built from ``config``; it becomes active only if none is.

    With ``init_weights=False`` A and B start at zero and ``config.init`` is not run (so
    pissa does not rewrite the base weight), while ``config`` is recorded as given: for
    loading trained factors from a file.

    Every parameter that is not an adapter's (A, B, a modules_to_save copy) is frozen,
    then ``config.bias`` decides which biases train.

    Returns:
        ``model`` itself, changed in place.

    Raises:
        LorakitError: ``config`` is not a LoraConfig, ``name`` is taken or empty, nothing
            matches ``target_modules`` or ``modules_to_save``, a target's parent never calls
            it, a saved module holds a target. The model is unchanged then.
    """
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"config must be a lorakit LoraConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise LorakitError(f"adapter name {name!r} is not usable; give a non-empty name without dots")
    configs = getattr(model, _CONFIGS, {})
    if name in configs:
        raise LorakitError(f"model already has an adapter {name!r} (has {sorted(configs)}); delete it or pick another name")
    modules = walk(model)
    paths = target_paths(model, config, modules)
    saved = saved_paths(model, config, modules)
    inside = [p for p in paths if any(p.startswith(s + ".") for s in saved)]
    if inside:
        raise LorakitError(f"modules_to_save selects a module holding the target {inside[0]}; "
                           "save a module without targets inside (e.g. the classification head)")
    merged = [p for p in paths if getattr(modules[p], "merged", ())]
    if merged:
        raise LorakitError(f"layers {merged[:3]} hold merged adapters; unmerge(model) before adding {name!r}")
    if init_weights and config.init in REWRITES_WEIGHT and tied_paths(modules, paths):
        raise LorakitError(f"init {config.init!r} rewrites the base weight, but {tied_paths(modules, paths)} share "
                           "theirs with another module (tied embeddings); exclude them or use init='gaussian'")

    for path in paths:
        module = modules[path]
        if not isinstance(module, LoraLayer):
            module = wrapper_for(module)(module)
            replace_module(model, modules, path, module)
        module.add_adapter(name, r=config.rank_for(path), alpha=config.alpha_for(path),
                           scaling=config.scaling_for(path), dropout=config.dropout,
                           init=config.init if init_weights else None)
    for path in saved:
        module = modules[path]
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            replace_module(model, modules, path, module)
        module.add_copy(name)

    # The walk holds no adapter or copy, so every parameter it reaches is the base model's.
    for module in modules.values():
        for param in module._parameters.values():
            if param is not None:
                param.requires_grad_(False)
    BIAS_MODES[config.bias](modules)

    object.__setattr__(model, _CONFIGS, {**configs, name: config})
    if not active_adapters(model):  # else nothing changes: the new adapter is not active anywhere
        _apply_active(model, (name,), modules)
    return model


def attach(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Attach a new adapter ``name`` to ``model`` and make it the active one.

    Same as :func:`add_adapter` followed by ``set_active(model, name)``. Right after
    attach the model computes exactly what it did before (B = 0), except with
    ``init="pissa"`` (equal within rounding) or ``"random"``.

    Raises:
        LorakitError: see :func:`add_adapter`.
    """
    add_adapter(model, config, name)
    set_active(model, name)
    return model


# ---------------------------------------------------------------------- switching


def _apply_active(model: nn.Module, names: tuple[str, ...], modules: dict[str, nn.Module] | None = None) -> None:
    for module in (walk(model) if modules is None else modules).values():
        if isinstance(module, (LoraLayer, SavedModule)):
            module.set_active(names)
    object.__setattr__(model, _ACTIVE, tuple(names))


def set_active(model: nn.Module, *names: str) -> None:
    """Make ``names`` the adapters the forward sums (``h = W x + Σ s_i B_i A_i x``).

    No names means the base model alone. Trainability (requires_grad) is not changed.

    Raises:
        LorakitError: an adapter name the model does not have.
    """
    check_names(model, names)
    _apply_active(model, tuple(dict.fromkeys(names)))


@contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model): model(x)`` runs the base model alone.

    Merged adapters are unmerged first (with a warning), as their ΔW sits in W.
    """
    layers = [m for m in walk(model).values() if isinstance(m, (LoraLayer, SavedModule))]
    if any(getattr(layer, "merged", ()) for layer in layers):
        warnings.warn("disable_adapters: unmerging the merged adapters so the base model runs alone", stacklevel=3)
        for layer in layers:
            if isinstance(layer, LoraLayer):
                layer.unmerge()
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.set_disabled(True)
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.set_disabled(was)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left with no adapter become their base module again.

    Raises:
        LorakitError: the model has no adapter ``name``.
    """
    check_names(model, [name])
    modules = walk(model)
    for path, module in list(modules.items()):
        if isinstance(module, LoraLayer) and name in module.adapters:
            module.delete_adapter(name)
            if not module.adapters:
                replace_module(model, modules, path, module.base_layer())
        elif isinstance(module, SavedModule):
            module.delete_copy(name)
            if not module.copies:
                replace_module(model, modules, path, module.original())
    configs = dict(getattr(model, _CONFIGS))
    del configs[name]
    object.__setattr__(model, _CONFIGS, configs)
    # Layers that held the adapter dropped it from their active set themselves; the rest hold no such name.
    object.__setattr__(model, _ACTIVE, tuple(n for n in active_adapters(model) if n != name))


# ---------------------------------------------------------------------- counting


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """PEFT's one-line summary: ``trainable params: 73,728 || all params: 22,786,944 || trainable%: 0.3236``."""
    trainable, total = count_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
