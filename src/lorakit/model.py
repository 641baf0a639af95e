"""Attach LoRA adapters to any ``torch.nn.Module`` and manage them: train, switch, merge.

``attach`` swaps the target modules in place for LoRA wrappers (the module paths and
state-dict keys of the user's model do not change), freezes every other parameter and
remembers each adapter's :class:`~lorakit.config.LoraConfig` on the model. Several
named adapters share one base model; ``set_active`` picks which ones the forward sums.
Weighted combination lives in :mod:`lorakit.combination`, per-row selection in
:mod:`lorakit.per_row`.

>>> model = attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> print(trainable_report(model))
trainable params: 73,728 || all params: 22,786,944 || trainable%: 0.3236
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig, name_matches
from lorakit.errors import LorakitError
from lorakit.layers import LINEAR_TYPES, LoraLayer, SavedModule, wrapper_for

_CONFIGS = "_lora_configs"  # model attribute: {adapter name: LoraConfig}
_ACTIVE = "_lora_active"  # model attribute: tuple of active adapter names

#: target_modules used when a config gives None, by ``model.config.model_type``
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "opt": ["q_proj", "v_proj"],
}
_HEAD_NAMES = ("classifier", "score")  # sequence-classification heads "all-linear" leaves out


# ---------------------------------------------------------------------- looking around


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of ``model`` as ``(module path, layer)``, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """Every ``modules_to_save`` wrapper as ``(module path, wrapper)``; ``wrapper.copies[name]``
    is adapter ``name``'s trainable copy."""
    for path, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield path, module


def lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config each adapter on ``model`` was made with, by adapter name (a copy of the dict)."""
    return dict(getattr(model, _CONFIGS, {}))


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters the forward currently sums."""
    return tuple(getattr(model, _ACTIVE, ()))


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules lorakit can wrap (or has wrapped), skipping its own internals."""
    skip: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        if isinstance(module, LoraLayer):
            skip.append(path + ".")
            yield path, module
        elif isinstance(module, SavedModule):
            skip.append(path + ".")
        elif wrapper_for(module) is not None and not any(True for _ in module.children()):
            yield path, module


def _base_of(module: nn.Module) -> nn.Module:
    return module._base if isinstance(module, LoraLayer) else module


def targetable_modules(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(path, type name, weight shape)`` of every module ``target_modules`` can name."""
    return [(path, type(_base_of(m)).__name__, tuple(_base_of(m).weight.shape)) for path, m in _candidates(model)]


def _targetable_summary(model: nn.Module) -> str:
    paths = [p for p, _, _ in targetable_modules(model)]
    if not paths:
        return "none (lorakit wraps nn.Linear, transformers Conv1D and nn.Embedding)"
    counts = Counter(p.rsplit(".", 1)[-1] for p in paths)
    names = ", ".join(f"{n} (×{c})" if c > 1 else n for n, c in counts.items())
    return f"{names}; e.g. {paths[0]!r}"


def _output_heads(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    named = dict((id(m), p) for p, m in model.named_modules())
    if out is not None and id(out) in named:
        heads.add(named[id(out)])
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and id(head) in named:
            heads.add(named[id(head)])
    return heads


def _target_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths ``config`` selects on ``model``.

    Raises:
        LorakitError: nothing matches (the message lists what could be targeted), or
            target_modules is None and the model family has no default.
    """
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = DEFAULT_TARGETS.get(model_type)
        if spec is None:
            raise LorakitError(
                f"no target_modules given and no default for model type {model_type!r}; "
                f"name some of: {_targetable_summary(model)}")
    if spec == ALL_LINEAR:
        heads = _output_heads(model)
        paths = [p for p, m in _candidates(model)
                 if isinstance(_base_of(m), LINEAR_TYPES) and not any(p == h or p.startswith(h + ".") for h in heads)]
    else:
        paths = [p for p, _ in _candidates(model) if name_matches(spec, p)]
    paths = [p for p in paths if not config.excludes(p)]
    if not paths:
        raise LorakitError(
            f"target_modules {spec!r} matched no module of {type(model).__name__}; "
            f"targetable modules: {_targetable_summary(model)}")
    return paths


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


# ---------------------------------------------------------------------- bias modes

def _bias_none(model: nn.Module) -> None:
    return None


def _bias_all(model: nn.Module) -> None:
    for pname, p in model.named_parameters():
        if pname == "bias" or pname.endswith(".bias"):
            p.requires_grad_(True)


def _bias_lora_only(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        if getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(True)


#: LoraConfig.bias -> which biases train
BIAS_MODES: dict[str, Callable[[nn.Module], None]] = {"none": _bias_none, "all": _bias_all, "lora_only": _bias_lora_only}


# ---------------------------------------------------------------------- attach

def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for _, layer in lora_layers(model):
        ids.update(id(p) for p in layer.adapters.parameters())
    for _, saved in saved_modules(model):
        ids.update(id(p) for p in saved.copies.parameters())
    return ids


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *,
                init_weights: bool = True) -> nn.Module:
    """Add adapter ``name`` built from ``config``; it becomes active only if none is.

    With ``init_weights=False`` A and B start at zero and ``config.init`` is not run (so
    pissa does not rewrite the base weight): for loading trained factors from a file.

    Every parameter that is not an adapter's (A, B, a modules_to_save copy) is frozen,
    then ``config.bias`` decides which biases train.

    Returns:
        ``model`` itself, changed in place.

    Raises:
        LorakitError: ``config`` is not a LoraConfig, ``name`` is taken or empty, nothing
            matches ``target_modules`` or ``modules_to_save``. The model is unchanged then.
    """
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"config must be a lorakit LoraConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise LorakitError(f"adapter name {name!r} is not usable; give a non-empty name without dots")
    configs = getattr(model, _CONFIGS, {})
    if name in configs:
        raise LorakitError(f"model already has an adapter {name!r} (has {sorted(configs)}); delete it or pick another name")
    paths = _target_paths(model, config)
    saved_paths = _saved_paths(model, config)
    merged = [p for p in paths if getattr(model.get_submodule(p), "merged", ())]
    if merged:
        raise LorakitError(f"layers {merged[:3]} hold merged adapters; unmerge(model) before adding {name!r}")
    if init_weights and config.init == "pissa" and _tied(model, paths):
        raise LorakitError(f"init 'pissa' rewrites the base weight, but {_tied(model, paths)} share theirs with "
                           "another module (tied embeddings); exclude them or use init='gaussian'")

    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLayer):
            module = wrapper_for(module)(module)
            _set_submodule(model, path, module)
        module.add_adapter(name, r=config.rank_for(path), alpha=config.alpha_for(path),
                           scaling=config.scaling_for(path), dropout=config.dropout,
                           init=config.init if init_weights else None)
    for path in saved_paths:
        module = model.get_submodule(path)
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            _set_submodule(model, path, module)
        module.add_copy(name)

    keep = _adapter_param_ids(model)
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    BIAS_MODES[config.bias](model)

    object.__setattr__(model, _CONFIGS, {**configs, name: config})
    active = active_adapters(model)
    _apply_active(model, active if active else (name,))
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


def _saved_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    paths, covered = [], []
    for path, module in model.named_modules():
        if not path or any(path.startswith(c) for c in covered):
            continue
        if isinstance(module, LoraLayer):
            continue
        if name_matches(config.modules_to_save, path):
            paths.append(path)
            covered.append(path + ".")
    if not paths:
        top = ", ".join(n for n, _ in model.named_children())
        raise LorakitError(f"modules_to_save {config.modules_to_save!r} matched no module of "
                           f"{type(model).__name__}; its top-level modules are: {top}")
    return paths


# ---------------------------------------------------------------------- switching

def _apply_active(model: nn.Module, names: tuple[str, ...]) -> None:
    for _, layer in lora_layers(model):
        layer.set_active(names)
    for _, saved in saved_modules(model):
        saved.set_active(names)
    object.__setattr__(model, _ACTIVE, tuple(names))


def _check_names(model: nn.Module, names: Iterable[str]) -> None:
    configs = getattr(model, _CONFIGS, {})
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise LorakitError(f"unknown adapter(s) {unknown}; the model has {sorted(configs) or 'none'}")


def set_active(model: nn.Module, *names: str) -> None:
    """Make ``names`` the adapters the forward sums (``h = W x + Σ s_i B_i A_i x``).

    No names means the base model alone. Trainability (requires_grad) is not changed.

    Raises:
        LorakitError: an adapter name the model does not have.
    """
    _check_names(model, names)
    _apply_active(model, tuple(dict.fromkeys(names)))


@contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model): model(x)`` runs the base model alone.

    Merged adapters are unmerged first (with a warning), as their ΔW sits in W.
    """
    layers = [layer for _, layer in lora_layers(model)] + [s for _, s in saved_modules(model)]
    if any(getattr(layer, "merged", ()) for layer in layers):
        warnings.warn("disable_adapters: unmerging the merged adapters so the base model runs alone", stacklevel=3)
        unmerge(model)
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
    _check_names(model, [name])
    for path, layer in list(lora_layers(model)):
        if name in layer.adapters:
            layer.delete_adapter(name)
            if not layer.adapters:
                _set_submodule(model, path, layer.base_layer())
    for path, saved in list(saved_modules(model)):
        saved.delete_copy(name)
        if not saved.copies:
            _set_submodule(model, path, saved.original())
    configs = dict(getattr(model, _CONFIGS))
    del configs[name]
    object.__setattr__(model, _CONFIGS, configs)
    _apply_active(model, tuple(n for n in active_adapters(model) if n != name))


# ---------------------------------------------------------------------- merge

def _tied(model: nn.Module, paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` (LoRA layers) whose weight another module shares (e.g. GPT-2's wte / lm_head)."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [p for p in paths if uses[id(model.get_submodule(p).weight)] > 1]


def merge(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Add ``ΔW`` of ``names`` (default: the active adapters) into the base weights.

    See :meth:`lorakit.layers.LoraLayer.merge` for precision and memory: ΔW in fp32;
    fp16/bf16 weights keep their original copy while merged so unmerge is bit-exact.
    Merging an adapter twice warns once and does nothing.

    Raises:
        LorakitError: an adapter name the model does not have.
    """
    names = tuple(active_adapters(model) if names is None else names)
    _check_names(model, names)
    layers = [layer for _, layer in lora_layers(model)]
    again = [n for n in names if any(n in layer.merged for layer in layers)]
    if again:
        warnings.warn(f"adapter(s) {again} already merged; merging again does nothing", stacklevel=2)
    todo = [n for n in names if n not in again]
    tied = _tied(model, [p for p, layer in lora_layers(model) if any(n in layer.adapters for n in todo)])
    if tied:
        warnings.warn(f"merging into {tied}, whose weight is tied to another module (e.g. the output head): "
                      "that module changes too; keep such adapters unmerged", stacklevel=2)
    for layer in layers:
        mine = [n for n in todo if n in layer.adapters]
        if mine:
            layer.merge(mine)


def unmerge(model: nn.Module) -> None:
    """Take every merged ``ΔW`` out of the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def _unwrap(model: nn.Module, *, keep_merged: bool) -> nn.Module:
    for path, layer in list(lora_layers(model)):
        if not keep_merged:
            layer.unmerge()
        _set_submodule(model, path, layer.base_layer())
    for path, saved in list(saved_modules(model)):
        _set_submodule(model, path, saved.current() if keep_merged else saved.original())
    for attr in (_CONFIGS, _ACTIVE, "_lora_row_layers"):  # the last: lorakit.per_row's cache
        model.__dict__.pop(attr, None)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model (original module types).

    modules_to_save modules are replaced by the active adapter's trained copy.

    Returns:
        ``model`` itself, with no lorakit module left in it.
    """
    pending = [n for n in active_adapters(model)
               if any(n in layer.adapters and n not in layer.merged for _, layer in lora_layers(model))]
    if pending:
        merge(model, pending)
    return _unwrap(model, keep_merged=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (merged ones are unmerged): the original model back."""
    return _unwrap(model, keep_merged=False)


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
