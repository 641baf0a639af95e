"""Attach LoRA adapters to any ``torch.nn.Module`` and keep track of them: add, switch, delete.

``attach`` swaps the target modules in place for LoRA wrappers (the module paths and
state-dict keys of the user's model do not change), freezes every other parameter and
remembers each adapter's :class:`~lorakit.config.LoraConfig` on the model. Several
named adapters share one base model; ``set_active`` picks which ones the forward sums.

Which modules a config selects lives in :mod:`lorakit.targets`, merging and unloading in
:mod:`lorakit.merging`, what is recorded on the model (configs, active set) in
:mod:`lorakit.adapter_records`; their public names are importable from here too.
Weighted combination is :mod:`lorakit.combination`, per-row selection :mod:`lorakit.per_row`.

Each operation walks the model's modules once (:func:`lorakit.targets.walk`), so loading
an adapter costs the same however many adapters are already on the model.

>>> model = attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> print(trainable_report(model))
trainable params: 73,728 || all params: 22,786,944 || trainable%: 0.3236
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Callable

from torch import nn

from lorakit.adapter_records import (  # noqa: F401  (re-exported)
    active_adapters, check_names, lora_configs, record_active, record_configs,
)
from lorakit.alora import activate, deactivate
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inits import REWRITES_WEIGHT
from lorakit.layers import LAYER_KINDS, LoraLayer, LoraLinear, LoraParameter, ParameterHost, SavedModule, wrapper_for
from lorakit.layers.fused import group_shared_inputs
from lorakit.merging import merge, merge_and_unload, unload, unmerge  # noqa: F401  (re-exported)
from lorakit.peft_format import with_task_heads
from lorakit.targets import (  # noqa: F401  (re-exported: lorakit.model is where users look)
    DEFAULT_TARGETS, lora_layers, parameter_targets, replace_module, saved_modules, saved_paths, target_paths,
    targetable_modules, tied_paths, walk,
)
from lorakit.tokens import attach_tokens, token_targets


# ---------------------------------------------------------------------- adapters on a model


def base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's own parameters (shared ones once), without any adapter's A and B or
    modules_to_save copy: the ones :func:`add_adapter` freezes."""
    seen: dict[int, nn.Parameter] = {}
    for module in walk(model).values():
        for param in module._parameters.values():
            if param is not None:
                seen.setdefault(id(param), param)
    return list(seen.values())


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
                init_weights: bool = True, kind: str = "lora") -> nn.Module:
    """Add adapter ``name`` built from ``config``; it becomes active only if none is.

    With ``init_weights=False`` A and B start at zero and ``config.init`` is not run (so
    pissa does not rewrite the base weight), while ``config`` is recorded as given: for
    loading trained factors from a file. Otherwise ``config`` is recorded as PEFT would
    attach it (:func:`lorakit.peft_format.with_task_heads`): ``task_type`` from the model
    when None and, with ``SEQ_CLS``, the classification head in ``modules_to_save``.

    ``kind`` is the layer kind that wraps the targets (:data:`lorakit.layers.LAYER_KINDS`):
    ``"lora"`` (``ΔW = s·B·A``; ``"dora"`` when ``config.use_dora``) or ``"adalora"``
    (``ΔW = s·P·diag(λ)·Q``, see :mod:`lorakit.adalora`); a layer holds adapters of one kind.
    ``config.target_parameters`` are adapted in place by :class:`~lorakit.layers.LoraParameter`.

    ``config.trainable_token_indices`` give the adapter rows of an embedding (:mod:`lorakit.tokens`).
    Every parameter that is not an adapter's (A, B, a modules_to_save copy, token rows) is frozen,
    then ``config.bias`` decides which biases train.

    Returns:
        ``model`` itself, changed in place.

    Raises:
        LorakitError: ``config`` is not a LoraConfig, ``name`` is taken or empty, nothing
            matches ``target_modules`` or ``modules_to_save``, a target's parent never calls
            it, a saved module holds a target, a target that layer ``kind`` cannot wrap or
            that holds adapters of another kind. The model is unchanged then.
    """
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"config must be a lorakit LoraConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise LorakitError(f"adapter name {name!r} is not usable; give a non-empty name without dots")
    configs = lora_configs(model)
    if name in configs:
        raise LorakitError(f"model already has an adapter {name!r} (has {sorted(configs)}); delete it or pick another name")
    if config.use_dora or config.target_parameters:
        if kind != "lora":
            raise LorakitError(f"{kind} adapters cannot use DoRA or target_parameters; use a plain LoRA config")
        kind = "dora" if config.use_dora else kind
    modules = walk(model)
    if init_weights:
        config = with_task_heads(model, config, modules)
    paths = target_paths(model, config, modules)
    params = parameter_targets(model, config, modules)
    if both := [f"{host}.{pname}" for host, pname in params if host in paths]:
        raise LorakitError(f"target_parameters selects {both[0]}, a parameter of a LoRA target module; "
                           "adapt it through target_modules or name another parameter")
    if init_weights and params and config.init not in LoraParameter.inits:
        raise LorakitError(f"LoRA on parameters starts with init {' or '.join(map(repr, LoraParameter.inits))}, "
                           f"not {config.init!r}")
    saved = saved_paths(model, config, modules)
    inside = [p for p in paths if any(p.startswith(s + ".") for s in saved)]
    if inside:
        raise LorakitError(f"modules_to_save selects a module holding the target {inside[0]}; "
                           "save a module without targets inside (e.g. the classification head)")
    tokens = token_targets(model, config, modules)
    merged = [p for p in paths if getattr(modules[p], "merged", ())]
    if merged:
        raise LorakitError(f"layers {merged[:3]} hold merged adapters; unmerge(model) before adding {name!r}")
    if init_weights and config.init in REWRITES_WEIGHT and tied_paths(modules, paths):
        raise LorakitError(f"init {config.init!r} rewrites the base weight, but {tied_paths(modules, paths)} share "
                           "theirs with another module (tied embeddings); exclude them or use init='gaussian'")
    wrappers = _wrappers(modules, paths, kind, config.init if init_weights else None, config.lora_bias)
    if config.alora_invocation_tokens and (dense := [p for p in paths if not issubclass(wrappers[p], LoraLinear)
                                                     or wrappers[p].kind != kind]):
        raise LorakitError(f"an activated adapter (alora_invocation_tokens) adapts dense layers only, as in PEFT; "
                           f"{dense[0]} is a {type(modules[dense[0]]).__name__}")
    if config.lora_bias and (bare := [p for p in paths if getattr(modules[p], "bias", None) is None]):
        warnings.warn(f"lora_bias on {len(bare)} layer(s) without a bias of their own (e.g. {bare[0]}): adapter "
                      f"{name!r} runs there unmerged, and merging it will be refused (as in PEFT)", stacklevel=2)

    for path in paths:
        module = modules[path]
        if not isinstance(module, LoraLayer) or type(module) is not wrappers[path]:
            module = module.rewrapped(wrappers[path]) if isinstance(module, LoraLayer) else wrappers[path](module)
            replace_module(model, modules, path, module)
        module.add_adapter(name, r=config.rank_for(path), alpha=config.alpha_for(path),
                           scaling=config.scaling_for(path), dropout=config.dropout,
                           init=config.init if init_weights else None, bias=config.lora_bias, kind=kind)
    for host_path, pname in params:
        host = modules[host_path]
        if not isinstance(host, ParameterHost):
            host = ParameterHost(host)
            replace_module(model, modules, host_path, host)
        layer = modules[f"{host_path}.lora_parameters.{pname}"] = host.adapt(pname)
        path = f"{host_path}.{pname}"
        layer.add_adapter(name, r=config.rank_for(path), alpha=config.alpha_for(path),
                          scaling=config.scaling_for(path), init=config.init if init_weights else None)
    for path in saved:
        module = modules[path]
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            replace_module(model, modules, path, module)
        module.add_copy(name)
    attach_tokens(model, config, name, modules, tokens)
    if config.alora_invocation_tokens:
        activate(model, name, config.alora_invocation_tokens, [modules[p] for p in paths])

    # The walk holds no adapter or copy, so every parameter it reaches is the base model's.
    for module in modules.values():
        for param in module._parameters.values():
            if param is not None:
                param.requires_grad_(False)
    BIAS_MODES[config.bias](modules)
    group_shared_inputs(modules)  # q/k/v, gate/up: computed together at run time

    record_configs(model, {**configs, name: config})
    if not active_adapters(model):  # else nothing changes: the new adapter is not active anywhere
        _apply_active(model, (name,), modules)
    return model


def _wrappers(modules: dict[str, nn.Module], paths: list[str], kind: str, init: str | None,
              lora_bias: bool = False) -> dict[str, type]:
    """The wrapper class of layer ``kind`` for each of ``paths`` (those wrapped already: their own).

    Raises:
        LorakitError: ``kind`` cannot wrap a target or does not start with ``init``, a
            target holds adapters of another kind, or ``lora_bias`` on a kind without it.
    """
    wrappers = {}
    for path in paths:
        module = modules[path]
        wrapper = type(module) if isinstance(module, LoraLayer) else wrapper_for(module, kind)
        if wrapper is None:
            wraps = ", ".join(sorted(t.__name__ for t in LAYER_KINDS[kind]))
            raise LorakitError(f"{kind} layers wrap {wraps}; {path} is a {type(module).__name__}: "
                               "leave it out of target_modules")
        if kind != wrapper.kind and kind not in wrapper.hosts:  # a DoRA layer holds LoRA adapters too (c = 1)
            other = wrapper_for(module.base_layer(), kind)  # LoRA's layer becomes DoRA's (LoraLayer.rewrapped)
            if other is None or wrapper.kind not in other.hosts:
                raise LorakitError(f"{path} holds {wrapper.kind} adapters {sorted(module.adapters)}, which a {kind} "
                                   f"adapter cannot join (only DoRA and LoRA adapters share a layer); delete those "
                                   f"before adding a {kind} adapter there")
            try:
                module.rewrapped(other, check_only=True)  # merged layers were refused above
            except LorakitError as err:
                raise LorakitError(f"{path}: {err}") from None
            wrapper = other
        if init is not None and wrapper.inits is not None and init not in wrapper.inits:
            raise LorakitError(f"{kind} layers start with init {' or '.join(map(repr, wrapper.inits))}, "
                               f"not {init!r}")
        if lora_bias and not wrapper.takes_lora_bias:
            raise LorakitError(f"lora_bias applies to linear and convolution layers (as in PEFT); {path} is a "
                               f"{type(getattr(module, '_base', module)).__name__}: leave it out of target_modules "
                               "or set lora_bias=False")
        wrappers[path] = wrapper
    return wrappers


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
    record_active(model, names)


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
    # a tied head only forgets the rows its embedding holds, so it goes after the embedding, wherever it sits
    order = sorted(modules.items(), key=lambda kv: isinstance(kv[1], SavedModule) and bool(getattr(kv[1], "tied", 0)))
    for path, module in order:
        if isinstance(module, LoraLayer) and name in module.adapters:
            module.delete_adapter(name)
            if module.adapters:  # a DoRA layer left with LoRA adapters alone becomes a LoRA layer again
                if module.hosts and not module.own_kind() and not module.merged:
                    replace_module(model, modules, path, module.rewrapped(wrapper_for(module.base_layer(),
                                                                                      module.hosts[0])))
                continue
            if module.in_place_of_module:
                replace_module(model, modules, path, module.base_layer())
            else:  # LoRA on a parameter: its host forgets it, and becomes the module again when empty
                host_path = path.rsplit(".", 2)[0]
                host = modules[host_path]
                host.release(module.parameter_name)
                if not host.lora_parameters:
                    replace_module(model, modules, host_path, host.original())
        elif isinstance(module, SavedModule):
            module.delete_copy(name)
            if not module.copies:
                replace_module(model, modules, path, module.original())
    group_shared_inputs(modules)
    deactivate(model, name)
    configs = lora_configs(model)
    del configs[name]
    record_configs(model, configs)
    # Layers that held the adapter dropped it from their active set themselves; the rest hold no such name.
    record_active(model, (n for n in active_adapters(model) if n != name))


# ---------------------------------------------------------------------- as a file holds it


def export_config(model: nn.Module, name: str = "default") -> LoraConfig:
    """Adapter ``name``'s config as its file holds it (what :func:`lorakit.io.save_adapter` writes).

    A layer kind that prunes directions (AdaLoRA) exports fewer than the adapter's rank at
    some modules (:meth:`lorakit.layers.LoraLayer.export_factors`): each such module gets its
    rank k in ``rank_pattern`` and, in ``alpha_pattern``, the alpha that keeps its scaling
    (``scaling·k``, or ``scaling·√k`` with rsLoRA); modules left with no direction are
    dropped, and ``target_modules`` lists the module paths kept. A plain LoRA adapter's
    config comes back as recorded.

    Raises:
        LorakitError: the model has no adapter ``name``, or it kept no direction anywhere.
    """
    check_names(model, [name])
    config = lora_configs(model)[name]
    ranks, pattern, alphas = {}, {}, {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            k = ranks[path] = layer.export_rank(name)
            if k and k != config.rank_for(path):
                pattern[path] = k
                alphas[path] = layer.adapters[name].scaling * (math.sqrt(k) if config.use_rslora else k)
    kept = [path for path, k in ranks.items() if k]
    if not kept:
        raise LorakitError(f"adapter {name!r} kept no direction in any module (every AdaLoRA λ is 0); "
                           "train for more steps or with a larger target rank")
    if not pattern and len(kept) == len(ranks):
        return config
    # pattern keys are matched first to last: the per-module entries go before the config's own
    return config.replace(
        target_modules=kept,
        rank_pattern={**pattern, **{k: v for k, v in config.rank_pattern.items() if k not in pattern}},
        alpha_pattern={**alphas, **{k: v for k, v in config.alpha_pattern.items() if k not in alphas}})


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
