"""What lorakit records on a model about its adapters: each adapter's config and the active set.

Both are plain attributes of the model object (not modules, not in its state dict):
``_lora_configs``, ``{adapter name: LoraConfig}``, replaced (never mutated) on every add
and delete, so a cache keyed by its identity knows when to rebuild; ``_lora_active``, the
names the forward sums. :mod:`lorakit.model` writes them, :mod:`lorakit.merging` and
:mod:`lorakit.per_row` read them; keeping them here lets those import downward only.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError

_CONFIGS = "_lora_configs"
_ACTIVE = "_lora_active"
_CACHE = "_lora_cache"  # (the configs dict it was built for, value): see cached_per_adapter_set


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config each adapter on ``model`` was made with, by adapter name (a copy of the dict)."""
    return dict(getattr(model, _CONFIGS, {}))


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters the forward currently sums."""
    return tuple(getattr(model, _ACTIVE, ()))


def check_names(model: nn.Module, names: Iterable[str]) -> None:
    """Raise a LorakitError naming every one of ``names`` the model has no adapter for."""
    configs = getattr(model, _CONFIGS, {})
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise LorakitError(f"unknown adapter(s) {unknown}; the model has {sorted(configs) or 'none'}")


def record_configs(model: nn.Module, configs: dict[str, LoraConfig]) -> None:
    """Make ``configs`` the model's adapters (a new dict: caches built for the old one rebuild)."""
    object.__setattr__(model, _CONFIGS, dict(configs))


def record_active(model: nn.Module, names: Iterable[str]) -> None:
    object.__setattr__(model, _ACTIVE, tuple(names))


def forget_adapters(model: nn.Module) -> None:
    """Drop every record (after the adapters were unloaded from the model)."""
    for attr in (_CONFIGS, _ACTIVE, _CACHE):
        model.__dict__.pop(attr, None)


def cached_per_adapter_set(model: nn.Module, build: Callable[[], object]):
    """``build()``, kept on the model until an adapter is added or deleted (e.g. the list of
    its LoRA layers, so that re-entering per-row mode skips a module walk)."""
    configs = getattr(model, _CONFIGS, None)
    cached = model.__dict__.get(_CACHE)
    if cached is None or cached[0] is not configs:
        cached = (configs, build())
        object.__setattr__(model, _CACHE, cached)
    return cached[1]
