"""What lorakit knows about a model's structure, in one place.

- which leaves are dense layers (``nn.Linear``, transformers ``Conv1D``; the type test itself lives in the bottom
  module :mod:`lorakit.dense`, re-exported here) and their weights as ``(out, in)``: :func:`linear_leaves`,
  :func:`weight_out_in`;
- which modules are output or task heads: :data:`HEAD_NAMES`, :func:`output_heads`, :func:`task_heads`; which are
  the repeated transformer blocks: :func:`transformer_blocks`;
- what kind of model it is (bare encoder, sequence classifier, causal LM, other): :func:`model_kind`,
  :func:`architecture_kind`, :func:`architecture_name`;
- which modules a :class:`~lorakit.config.LoraConfig` selects, which parameters LoRA on parameters is for, where
  lorakit's own layers sit, and replacing a module: :func:`target_paths`, :func:`adaptable_parameters`,
  :func:`saved_paths`, :func:`walk`, :func:`replace_module`.

Everything here reads the model through :func:`walk`: one pass over its modules that does not descend into lorakit's
own parts (a LoRA layer's ``adapters``, a saved module's ``copies``), so its cost grows with the base model's
modules, not with the number of adapters loaded. An operation walks once and hands the result down.

>>> target_paths(model, LoraConfig(target_modules=["q_proj", "v_proj"]))[:2]
['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator

from torch import nn

from lorakit.config import LoraConfig
from lorakit.dense import (  # noqa: F401  (re-exported: structure questions are asked here)
    BYPASSED_CHILDREN, CONV_TYPES, LINEAR_TYPES, Conv1D, bypass_reason, is_conv, is_conv1d, is_linear, linear_features,
    parameter_features, weight_out_in,
)
from lorakit.dense import adaptable_parameters as _adaptable
from lorakit.errors import LorakitError
from lorakit.model_kinds import (  # noqa: F401  (re-exported: structure questions are asked here)
    BARE, CAUSAL_LM, CLASSIFIER, MODEL_KINDS, OTHER, architecture_kind, architecture_name, model_fingerprint, model_kind,
    position_limit,
)
from lorakit.layers import LoraLayer, ParameterHost, SavedModule, wrapper_for
from lorakit.module_names import ALL_LINEAR, name_matches, parameter_matches
from lorakit.target_defaults import DEFAULT_TARGETS  # noqa: F401  (re-exported)
from lorakit.target_defaults import default_targets as _family_targets

#: attribute names of the heads transformers puts on a body; the first two are the
#: sequence-classification heads (PEFT's names for them, saved whole with task_type SEQ_CLS)
HEAD_NAMES = ("classifier", "score", "qa_outputs", "cls", "lm_head")
CLASSIFIER_HEADS = HEAD_NAMES[:2]


# ---------------------------------------------------------------------- one walk


def walk(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by path, in module order (as ``named_modules``, shared
    modules once), without a LoRA layer's ``adapters`` or a saved module's ``copies``."""
    modules: dict[str, nn.Module] = {}
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        modules[path] = module
        skip = "adapters" if isinstance(module, LoraLayer) else "copies" if isinstance(module, SavedModule) else None
        prefix = path + "." if path else ""
        children = [(prefix + n, c) for n, c in module._modules.items() if c is not None and n != skip]
        stack.extend(reversed(children))
    return modules


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of ``model`` as ``(path, layer)``, in module order: the module path, or
    for LoRA on a parameter the parameter's name ``<module path>.<parameter>`` (what
    ``target_parameters``, ``rank_pattern`` and ``alpha_pattern`` match)."""
    for path, module in walk(model).items():
        if isinstance(module, LoraLayer):
            yield layer_path(path, module), module


def layer_path(path: str, layer: LoraLayer) -> str:
    """A LoRA layer's path from its module path in a walk (see :func:`lora_layers`)."""
    if layer.in_place_of_module:
        return path
    return f"{path.rsplit('.', 2)[0]}.{layer.parameter_name}"  # <host>.lora_parameters.<name>


def parameter_hosts(model: nn.Module) -> Iterator[tuple[str, ParameterHost]]:
    """Every module holding LoRA on its parameters as ``(module path, host)``;
    ``host.lora_parameters[name]`` is the :class:`~lorakit.layers.LoraParameter` of parameter ``name``."""
    for path, module in walk(model).items():
        if isinstance(module, ParameterHost):
            yield path, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """Every ``modules_to_save`` wrapper as ``(module path, wrapper)``; ``wrapper.copies[name]``
    is adapter ``name``'s trainable copy."""
    for path, module in walk(model).items():
        if isinstance(module, SavedModule):
            yield path, module


def replace_module(model: nn.Module, modules: dict[str, nn.Module], path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` of ``model`` and in ``modules`` (a :func:`walk` of it)."""
    parent_path, _, child = path.rpartition(".")
    parent = modules.get(parent_path) if parent_path else model
    if parent is None:
        parent = model.get_submodule(parent_path)
    setattr(parent, child, new)
    modules[path] = new


# ---------------------------------------------------------------------- what can be targeted


def _base_of(module: nn.Module) -> nn.Module:
    return module._base if isinstance(module, LoraLayer) else module


def _candidates(modules: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules lorakit can wrap (or has wrapped), outside modules_to_save wrappers."""
    saved: list[str] = []
    for path, module in modules.items():
        if saved and any(path.startswith(s) for s in saved):
            continue
        if isinstance(module, LoraLayer):
            if module.in_place_of_module:
                yield path, module
        elif isinstance(module, SavedModule):
            saved.append(path + ".")
        elif isinstance(module, ParameterHost):
            saved.append(path + ".lora_parameters.")
        elif wrapper_for(module) is not None and not any(c is not None for c in module._modules.values()):
            yield path, module


def targetable_modules(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(path, type name, weight shape)`` of every module ``target_modules`` can name."""
    return [(path, type(_base_of(m)).__name__, tuple(_base_of(m).weight.shape))
            for path, m in _candidates(walk(model))]


def _targetable_summary(modules: dict[str, nn.Module]) -> str:
    paths = [p for p, _ in _candidates(modules)]
    if not paths:
        return "none (lorakit wraps nn.Linear, transformers Conv1D, nn.Embedding and nn.Conv1d/2d/3d)"
    params = adaptable_parameters(modules[""], modules)
    named = [Counter(p.rsplit(".", 1)[-1] for p in paths), Counter(f"{p.rsplit('.', 1)[-1]}.{n}" for p, n in params)]
    names = [", ".join(f"{n} (×{c})" if c > 1 else n for n, c in counts.items()) for counts in named]
    return f"{names[0]}; e.g. {paths[0]!r}" + (f"; parameters (--target-parameters): {names[1]}" if names[1] else "")


def adaptable_parameters(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> list[tuple[str, str]]:
    """:func:`lorakit.dense.adaptable_parameters` of ``model`` (fused experts, routers), lorakit's layers left out."""
    return _adaptable(walk(model) if modules is None else modules, (LoraLayer,))


# ---------------------------------------------------------------------- heads, dense leaves, kinds


def output_heads(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> list[str]:
    """Paths of ``model``'s heads, in module order: its output embeddings
    (``get_output_embeddings()``) and the children named in :data:`HEAD_NAMES`.

    ``"all-linear"`` and the weight analyses leave these out: a head is trained whole, not
    adapted. ``modules``: a :func:`walk` of ``model`` the caller already has.
    """
    modules = walk(model) if modules is None else modules
    get_out = getattr(model, "get_output_embeddings", None)
    heads = {id(h) for h in [get_out() if callable(get_out) else None] + [getattr(model, n, None) for n in HEAD_NAMES]
             if isinstance(h, nn.Module)}
    return [path for path, module in modules.items() if path and id(module) in heads]


def task_heads(model: nn.Module) -> list[str]:
    """Names of the top-level children of a transformers model with parameters outside the
    pretrained body (``base_model_prefix``): what a task adds, trained in full
    (``["classifier"]`` for BERT, ``["pre_classifier", "classifier"]`` for DistilBERT)."""
    body = getattr(model, "base_model_prefix", None)
    return [name for name, child in model.named_children()
            if name != body and any(True for _ in child.parameters())]


def linear_leaves(model: nn.Module, *, heads: bool = False,
                  modules: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """Every dense leaf of ``model`` (``nn.Linear`` / ``Conv1D`` without children) by path,
    in module order; a LoRA layer stands for the base layer it wraps.

    Args:
        heads: keep the layers inside :func:`output_heads` too (left out by default).
        modules: a :func:`walk` of ``model`` the caller already has.
    """
    modules = walk(model) if modules is None else modules
    skip = () if heads else tuple(h + "." for h in output_heads(model, modules))
    leaves = {}
    for path, module in modules.items():
        base = _base_of(module)
        if is_linear(base) and not any(c is not None for c in base._modules.values()) \
                and not (path + ".").startswith(skip):
            leaves[path] = base
    return leaves


def transformer_blocks(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """The repeated blocks of ``model``'s body by path, in module order
    (``{"model.layers.0": LlamaDecoderLayer, ...}``): what FSDP shards one unit each.

    A block is a child of an ``nn.ModuleList`` whose class a transformers model names in
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ``BertLayer``); for other
    models, the children of the ``nn.ModuleList`` holding the most parameters whose
    children are all of one type (``nn.TransformerEncoder.layers``). Empty when there is none.

    Args:
        modules: a :func:`walk` of ``model`` the caller already has.
    """
    modules = walk(model) if modules is None else modules
    lists = {path: m for path, m in modules.items() if isinstance(m, nn.ModuleList) and len(m)}
    named = set(getattr(model, "_no_split_modules", None) or ())
    found = {_join(path, str(i)): child for path, m in lists.items() for i, child in enumerate(m)
             if type(child).__name__ in named}
    if not found:
        uniform = {path: sum(p.numel() for p in m.parameters()) for path, m in lists.items()
                   if len({type(child) for child in m}) == 1}
        if uniform and max(uniform.values()) > 0:
            path = max(uniform, key=uniform.get)
            found = {_join(path, str(i)): child for i, child in enumerate(lists[path])}
    blocks: dict[str, nn.Module] = {}
    for path, block in found.items():  # in module order, so an outer block comes before what it holds
        if not any(path.startswith(outer + ".") for outer in blocks):
            blocks[path] = block
    return blocks


def _join(path: str, child: str) -> str:
    return f"{path}.{child}" if path else child


def default_targets(model_type: str | None, modules: dict[str, nn.Module]) -> list[str] | None:
    """The targets a config without any takes on the model of walk ``modules``
    (:func:`lorakit.target_defaults.default_targets` with the model's linear leaf names)."""
    names = {p.rsplit(".", 1)[-1] for p, m in _candidates(modules) if isinstance(_base_of(m), LINEAR_TYPES)}
    return _family_targets(model_type, names)


# ---------------------------------------------------------------------- what a config selects


def target_paths(model: nn.Module, config: LoraConfig, modules: dict[str, nn.Module] | None = None) -> list[str]:
    """Module paths ``config.target_modules`` selects on ``model``, in module order.

    ``"all-linear"`` takes every nn.Linear / Conv1D except the output head, the
    classification head and layers whose parent never calls them (:data:`BYPASSED_CHILDREN`).

    Args:
        modules: a :func:`walk` of ``model`` the caller already has (saves a walk).

    Raises:
        LorakitError: nothing matches (the message lists what could be targeted),
            target_modules is None and the model family has no default, or a selected
            module's parent never calls its forward (e.g. ``nn.MultiheadAttention.out_proj``).
    """
    modules = walk(model) if modules is None else modules
    spec = config.target_modules
    if config.target_parameters and not spec:
        return []  # the adapter targets parameters alone
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = default_targets(model_type, modules)
        if spec is None:
            raise LorakitError(f"no target_modules given and no default for model type {model_type!r}; "
                               f"name some of: {_targetable_summary(modules)}")
    if spec == ALL_LINEAR:
        heads = tuple(h + "." for h in output_heads(model, modules))
        paths = [p for p, m in _candidates(modules)
                 if isinstance(_base_of(m), LINEAR_TYPES) and not (p + ".").startswith(heads)]
    else:
        paths = [p for p, _ in _candidates(modules) if name_matches(spec, p)]
        if isinstance(spec, list):
            _refuse_unwrappable(modules, config, set(paths))
    outside_layers = [p for p in paths if not config.in_layers(p, spec)]
    paths = [p for p in paths if config.in_layers(p, spec)] if outside_layers else paths
    saved_inside = [p for p in paths if config.within_saved(p)]
    paths = [p for p in paths if not config.excludes(p) and not config.within_saved(p)]
    bypassed = {p: why for p in paths if (why := bypass_reason(modules, p)) is not None}
    if spec == ALL_LINEAR:
        paths = [p for p in paths if p not in bypassed]
    if not paths:
        left_out = ""
        if bypassed:
            path, why = next(iter(bypassed.items()))
            left_out = f"; left out {len(bypassed)} whose parent never calls them, e.g. {path}: {why}"
        if saved_inside:
            left_out += (f"; left out {len(saved_inside)} in modules_to_save (saved whole, so not LoRA targets), "
                         f"e.g. {saved_inside[0]}")
        if outside_layers:  # the blocks named, not the names, are what missed: say that first
            raise LorakitError(f"layers_to_transform {config.layers_to_transform!r} leaves out all {len(outside_layers)} "
                               f"modules target_modules {spec!r} matches, e.g. {outside_layers[0]}{left_out}; name "
                               "blocks this model has (lorakit inspect lists them)")
        raise LorakitError(f"target_modules {spec!r} matched no module of {type(model).__name__}; "
                           f"targetable modules: {_targetable_summary(modules)}{left_out}")
    if bypassed and spec != ALL_LINEAR:
        path, why = next(iter(bypassed.items()))
        more = f" ({len(bypassed) - 1} more like it)" if len(bypassed) > 1 else ""
        raise LorakitError(f"cannot target {path}: {why}, so a LoRA adapter there would never run{more}; "
                           f"exclude it (exclude_modules=[{path!r}]) or target other modules")
    return paths


def _refuse_unwrappable(modules: dict[str, nn.Module], config: LoraConfig, taken: set[str]) -> None:
    """A leaf with a weight that ``config.target_modules`` names outright but lorakit cannot wrap (a
    grouped convolution, a norm) is refused, as PEFT refuses a module it cannot adapt, rather than left out in
    silence (PEFT adapts a grouped convolution where the rank is a multiple of its groups; lorakit does not)."""
    names, saved = config.target_modules, tuple(p + "." for p, m in modules.items() if isinstance(m, SavedModule))
    refused = [(p, m) for p, m in modules.items() if p not in taken and name_matches(names, p) and not m._modules
               and isinstance(getattr(m, "weight", None), nn.Parameter) and not (p + ".").startswith(saved)
               and config.in_layers(p, names) and not config.excludes(p) and not config.within_saved(p)]
    if refused:
        (path, module), groups = refused[0], getattr(refused[0][1], "groups", 1)
        kind = type(module).__name__ + (f" with groups={groups}" if groups != 1 else "")
        more = f" ({len(refused) - 1} more like it)" if len(refused) > 1 else ""
        raise LorakitError(f"cannot target {path}, a {kind}{more}: lorakit adapts nn.Linear, transformers Conv1D, "
                           f"nn.Embedding and nn.Conv1d/2d/3d with groups=1; leave it out of target_modules, or "
                           f"exclude it (exclude_modules=[{path!r}])")


def saved_paths(model: nn.Module, config: LoraConfig, modules: dict[str, nn.Module] | None = None) -> list[str]:
    """Module paths ``config.modules_to_save`` selects on ``model`` (outermost matches only).

    Args:
        modules: a :func:`walk` of ``model`` the caller already has (saves a walk).

    Raises:
        LorakitError: modules_to_save names modules but none matches (the message lists
            the model's top-level modules), or a match holds a LoRA layer.
    """
    if not config.modules_to_save:
        return []
    modules = walk(model) if modules is None else modules
    paths: list[str] = []
    for path, module in modules.items():
        if not path or isinstance(module, LoraLayer) or any(path.startswith(p + ".") for p in paths):
            continue
        if config.saves(path):
            paths.append(path)
    holding = [p for p in paths for q, m in modules.items() if q.startswith(p + ".") and isinstance(m, LoraLayer)]
    if holding:
        raise LorakitError(f"modules_to_save selects {holding[0]}, which holds LoRA layers; save a module "
                           "without adapters inside (e.g. the classification head)")
    if not paths:
        top = ", ".join(n for n, _ in model.named_children())
        raise LorakitError(f"modules_to_save {config.modules_to_save!r} matched no module of "
                           f"{type(model).__name__}; its top-level modules are: {top}")
    return paths


def tied_paths(modules: dict[str, nn.Module], paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` whose weight another module shares (e.g. GPT-2's wte / lm_head).

    Args:
        modules: a :func:`walk` of the model.
    """
    uses = Counter(id(p) for m in modules.values() for p in m._parameters.values() if p is not None)
    return [p for p in paths if uses[id(modules[p].weight)] > 1]


def parameter_targets(model: nn.Module, config: LoraConfig,
                      modules: dict[str, nn.Module] | None = None) -> list[tuple[str, str]]:
    """``(module path, parameter name)`` of each parameter ``config.target_parameters`` selects, in
    module order and, within a module, in its parameter order (PEFT's rule: ``<module path>.<name>``
    equals an entry or ends in ``"." + entry``).

    Raises:
        LorakitError: an entry matches no parameter, or one of the model itself, of a LoRA target,
            or one that is neither a matrix nor a stack of them.
    """
    wanted, found, hit = config.target_parameters or [], [], set()
    for path, module in (walk(model) if modules is None else modules).items() if wanted else ():
        for name, param in ((n, p) for n, p in module._parameters.items() if p is not None):
            key = f"{path}.{name}" if path else name
            matched = [t for t in wanted if parameter_matches(t, key)]
            why = ("of the model itself" if not path else "of a LoRA target module" if isinstance(module, LoraLayer)
                   else f"of shape {tuple(param.shape)}, not (out, in) or (experts, out, in)" if param.dim() not in (2, 3)
                   else None)
            if matched and why:
                raise LorakitError(f"target_parameters selects {key}, a parameter {why}; name another parameter "
                                   "(a module's own weight is adapted through target_modules)")
            hit.update(matched)
            found += [(path, name)] if matched else []
    if missing := [t for t in wanted if t not in hit]:
        raise LorakitError(f"target_parameters {missing} matched no parameter of {type(model).__name__}; name "
                           "parameters as <module path>.<name> or its end, e.g. 'experts.gate_up_proj'")
    return found
