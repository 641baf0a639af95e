"""Loading a PEFT-format adapter onto a model: every tensor matched to its place first.

:func:`plan_load` checks every tensor of a file against the model (keys and shapes from
:mod:`lorakit.peft_format`: LoRA factors of modules and of parameters, DoRA's magnitudes, biases on B,
modules_to_save weights, biases) and raises one :class:`~lorakit.errors.LorakitError`
listing every problem; only then does :func:`apply_plan` write into the model (after
:func:`lorakit.model.add_adapter` made the adapter). Used by :func:`lorakit.io.load_adapter`.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.peft_format import (
    PREFIX, factor_dims, file_shapes, nested_key_paths, parameter_name, parse_bias_key, parse_factor_key,
    parse_magnitude_key, parse_token_key, task_heads,
)
from lorakit.targets import (
    CLASSIFIER_HEADS, ParameterHost, model_fingerprint, parameter_features, parameter_targets, saved_paths, target_paths, walk,
)
from lorakit.tokens import token_targets

_MAX_LISTED = 20


def _with_file_heads(model: nn.Module, config: LoraConfig, tensors: dict, source,
                     modules: dict[str, nn.Module]) -> LoraConfig:
    """A file's config as PEFT loads it: with ``SEQ_CLS``, ``TOKEN_CLS`` or ``QUESTION_ANS``
    the task heads join ``modules_to_save``. A file without their weights (written by an
    older lorakit, which PEFT refuses) loads as saved, its task_type cleared, with a warning."""
    added = [n for n in task_heads(model, config.task_type, modules) if n not in (config.modules_to_save or [])]
    if not added:
        return config
    names = {parameter_name(k) for k in tensors}
    held = [n for n in added if any(p.endswith(n) and f"{p}.weight" in names for p in modules if p)]
    if held == added:
        return config.replace(modules_to_save=[*(config.modules_to_save or []), *added])
    paths = factor_paths(tensors)
    if paths and not any(_has_module(model, p) for p in paths):
        return config  # a file of another architecture: its misfit is the one thing to say (raise_misfit)
    warnings.warn(f"adapter {source} has task_type {config.task_type} but holds no weights for {added}, so PEFT "
                  "cannot load it; lorakit loads it with the model's own head (save it again to write a file PEFT "
                  "loads)", stacklevel=4)
    return config.replace(task_type=None)


# ---------------------------------------------------------------------- loading a file onto a model


@dataclass
class LoadPlan:
    """Where each validated tensor of a file goes.

    Attributes:
        factors: ``(layer's module path, A: (r, in), B: (out, r), m: (out,) or None, b: (out,) or None)``
            per target (``b``: the bias on B of ``lora_bias``)
            (a module, or a parameter's :class:`~lorakit.layers.LoraParameter` at
            ``<module>.lora_parameters.<name>``), reshaped to lorakit's matrices.
        saved: modules_to_save path -> its state dict from the file.
        resized: modules_to_save path -> the keys of its per-class tensors that hold another number of
            classes than the model's head (a classifier adapter trained for its own labels; see
            :func:`_per_class`): the adapter's copy of the head takes the file's shapes.
        params: ``(parameter name, tensor)`` written into the base model (biases, and
            full embeddings PEFT saves).
        tokens: embedding path -> its trainable token rows ``(n, dim)`` (``trainable_token_indices``).
        config: the file's config as it is added to the model (see :func:`with_task_heads`).
    """

    config: LoraConfig | None = None
    factors: list = field(default_factory=list)
    saved: dict = field(default_factory=dict)
    resized: dict = field(default_factory=dict)
    params: list = field(default_factory=list)
    tokens: dict = field(default_factory=dict)


def plan_load(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], name: str,
              source, metadata: dict[str, str]) -> LoadPlan:
    """Match every tensor to its place in ``model`` without changing the model.

    Raises:
        LorakitError: anything does not fit; the message lists every missing or
            unexpected key and every shape mismatch with its module path.
    """
    modules = walk(model)
    config = _with_file_heads(model, config, tensors, source, modules)
    try:
        config = _with_tied_heads(config, target_paths(model, config, modules), tensors, modules)
        targets = [(path, path, modules[path], config.rank_for(path), None) for path in target_paths(model, config, modules)]
        targets += _parameter_targets(model, config, modules)
        saved = saved_paths(model, config, modules)
        token_paths = token_targets(model, config, modules)
    except LorakitError as err:
        raise_misfit(model, source, metadata, tensors, [str(err)])
    problems: list[str] = []
    plan = LoadPlan(config=config, saved={p: {} for p in saved})
    factors, magnitudes, biases = _sort_keys(model, tensors, plan, problems)
    plan.factors = _check_factors(model, config, name, targets, factors, magnitudes, problems)
    plan.factors = _with_biases(config, plan.factors, biases, problems)
    _check_saved(model, modules, plan, problems)
    _check_tokens(modules, token_paths, plan.tokens, problems)
    if problems:
        raise_misfit(model, source, metadata, tensors, problems)
    return plan


def _with_tied_heads(config: LoraConfig, paths: list[str], tensors: dict, modules: dict) -> LoraConfig:
    """A file's config with the modules it holds factors for that its ``target_modules`` do not select but
    whose weight a selected one shares added to them: PEFT's ``ensure_weight_tying`` puts an adapter on an
    output head tied to an adapted embedding (the embedding's factors transposed) and records only the
    embedding. Each gets a layer of its own, which computes what PEFT's pair does."""
    weights = {id(getattr(modules[p], "weight", None)) for p in paths}
    held = sorted(factor_paths(tensors))
    tied = [p for p in held if p not in paths and p in modules and isinstance(getattr(modules[p], "weight", None),
                                                                                  torch.Tensor)
            and id(modules[p].weight) in weights]
    if not tied:
        return config
    spec = config.target_modules
    if isinstance(spec, str):  # a regex, matched whole: the tied paths as alternatives
        return config.replace(target_modules=f"(?:{spec})|" + "|".join(re.escape(p) for p in tied))
    return config.replace(target_modules=[*spec, *tied])


def _parameter_targets(model, config, modules) -> list[tuple]:
    """``(key path, layer's module path, (module, name), rank, experts)`` of each parameter target."""
    found = parameter_targets(model, config, modules)
    out = []
    for (path, pname), key in nested_key_paths(found).items():
        host = modules[path]
        host = host._host if isinstance(host, ParameterHost) else host
        out.append((key, f"{path}.lora_parameters.{pname}", (host, pname), config.rank_for(f"{path}.{pname}"),
                    parameter_features(host, pname)))
    return out


def _sort_keys(model, tensors, plan: LoadPlan, problems: list[str]) -> tuple[dict, dict, dict]:
    """Factors, DoRA magnitudes and biases on B by key path (returned); saved-module and base
    tensors into ``plan``."""
    factors: dict[str, dict] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    model_params = None  # built only when the file holds more than LoRA factors
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            problems.append(f"unexpected key {key} (keys start with {PREFIX!r})")
            continue
        parsed = parse_factor_key(key)
        if parsed is not None:
            path, factor, embedding = parsed
            factors.setdefault(path, {})[factor] = (tensor, embedding)
            continue
        path = parse_magnitude_key(key)
        if path is not None:
            magnitudes[path] = tensor
            continue
        path = parse_bias_key(key)
        if path is not None:
            biases[path] = tensor
            continue
        path = parse_token_key(key)
        if path is not None:
            plan.tokens[path] = tensor
            continue
        local = key[len(PREFIX):]
        if ".original_module." in local or ".modules_to_save." in local:
            continue  # PEFT's wrapper internals (bias="all"): duplicates of keys it also writes plainly
        owner = next((p for p in plan.saved if local.startswith(p + ".")), None)
        if owner is not None:
            plan.saved[owner][local[len(owner) + 1:]] = tensor
            continue
        pname = parameter_name(key)
        if model_params is None:
            model_params = dict(model.named_parameters(remove_duplicate=False))
        if pname not in model_params:
            problems.append(f"unexpected key {key}: the model has no parameter {pname}")
        elif tuple(tensor.shape) != tuple(model_params[pname].shape):
            problems.append(_shape_problem(model, pname, tensor, model_params[pname]))
        else:
            plan.params.append((pname, tensor))
    return factors, magnitudes, biases


def _check_factors(model, config, name, targets, factors, magnitudes, problems) -> list:
    planned = []
    for key_path, where, module, r, experts in targets:
        found = factors.pop(key_path, {})
        magnitude = magnitudes.pop(key_path, None)
        if experts is None:
            in_f, out_f, embedding = factor_dims(module)
            rows, shapes = r, file_shapes(module, r)
        else:  # LoRA on a parameter: one rank-r adapter per expert, stacked
            E, in_f, out_f, _ = experts
            embedding, rows = False, r * E
            shapes = ((rows, in_f), (out_f, rows), None)
        kind = "lora_embedding_" if embedding else "lora_"
        if "A" not in found or "B" not in found:
            problems.append(f"missing {' and '.join(kind + f for f in 'AB' if f not in found)} for {key_path}")
            continue
        (A, a_emb), (B, b_emb) = found["A"], found["B"]
        if len(shapes[0]) > 2 and A.dim() == B.dim() == 2 and (A.numel(), B.numel()) == (
                math.prod(shapes[0]), math.prod(shapes[1])):  # a convolution's factors flat, as AdaLoRA's
            A, B = A.reshape(shapes[0]), B.reshape(shapes[1])
        if a_emb != embedding or b_emb != embedding:
            have, want = ("an embedding", "a linear layer") if embedding else ("a linear layer", "an embedding")
            problems.append(f"{key_path} is {have} in the model but the file stores it as {want}")
        elif A.dim() != len(shapes[0]) or B.dim() != len(shapes[1]):
            problems.append(f"{key_path}: the file holds A {tuple(A.shape)} and B {tuple(B.shape)}, the model's "
                            f"layer needs A {shapes[0]} and B {shapes[1]}")
        elif A.shape[0] != rows or B.shape[1] != rows:
            held = A.shape[0] // (rows // r)
            problems.append(f"adapter {name!r} has rank {r} but the file holds rank {held} for {key_path}")
        elif tuple(A.shape) != shapes[0] or tuple(B.shape) != shapes[1]:
            problems.append(f"{key_path}: the file holds A {tuple(A.shape)} and B {tuple(B.shape)}, the model's "
                            f"layer needs A {shapes[0]} and B {shapes[1]}")
        elif config.use_dora and magnitude is None:
            problems.append(f"missing lora_magnitude_vector for {key_path} (the config says use_dora)")
        elif magnitude is not None and (not config.use_dora or tuple(magnitude.shape) != shapes[2]):
            want = f"needs {shapes[2]}" if config.use_dora else "has no DoRA (use_dora is false)"
            problems.append(f"{key_path}: the file holds a magnitude vector {tuple(magnitude.shape)}, the layer {want}")
        else:
            planned.append((where, A.reshape(rows, in_f), B.reshape(out_f, rows),
                            None if magnitude is None else magnitude.reshape(out_f)))
    for path in sorted(factors):
        why = "the config's target_modules do not select it" if _has_module(model, path) else "the model has no such module"
        problems.append(f"unexpected LoRA factors for {path}: {why}")
    problems.extend(f"unexpected lora_magnitude_vector for {path}: no target of the config has it"
                    for path in sorted(magnitudes))
    return planned


def _with_biases(config: LoraConfig, planned: list, biases: dict, problems: list[str]) -> list:
    """Each planned target with its bias on B from the file (``lora_bias``), checked: one per target
    when the config says lora_bias, none otherwise, ``(out,)`` each."""
    out = []
    for where, A, B, magnitude in planned:
        bias = biases.pop(where, None)
        if config.lora_bias and bias is None:
            problems.append(f"missing lora_B.bias for {where} (the config says lora_bias)")
        elif bias is not None and not config.lora_bias:
            problems.append(f"{where}: the file holds a lora_B.bias, but its config has lora_bias false")
        elif bias is not None and tuple(bias.shape) != (B.shape[0],):
            problems.append(f"{where}: the file holds lora_B.bias {tuple(bias.shape)}, the layer needs ({B.shape[0]},)")
        out.append((where, A, B, magnitude, bias))
    problems.extend(f"unexpected lora_B.bias for {path}: no target of the config has it" for path in sorted(biases))
    return out


def _check_saved(model, modules, plan: LoadPlan, problems: list[str]) -> None:
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    for path, state in plan.saved.items():
        module = modules[path]
        want = (module.original() if hasattr(module, "copies") else module).state_dict()
        problems.extend(f"missing modules_to_save weight {path}.{k}" for k in sorted(set(want) - set(state)))
        problems.extend(f"unexpected modules_to_save weight {path}.{k}" for k in sorted(set(state) - set(want)))
        for k in sorted(set(state) & set(want)):
            if state[k].shape == want[k].shape:
                continue
            if _per_class(path, state[k], want[k], classes):
                plan.resized.setdefault(path, []).append(k)
            else:
                problems.append(_shape_problem(model, f"{path}.{k}", state[k], want[k]))


def _check_tokens(modules, token_paths: dict[str, list[int]], tokens: dict, problems: list[str]) -> None:
    """The file's token rows against the config's: one ``(len(ids), dim)`` tensor per selected embedding."""
    for path, ids in token_paths.items():
        rows = tokens.get(path)
        dim = modules[path].weight.shape[1]
        if rows is None:
            problems.append(f"missing trainable_tokens_delta for {path} (the config's trainable_token_indices select it)")
        elif tuple(rows.shape) != (len(ids), dim):
            problems.append(f"{path}: the file holds trainable_tokens_delta {tuple(rows.shape)}, the config's "
                            f"{len(ids)} token ids on a {dim}-wide embedding need ({len(ids)}, {dim})")
    problems.extend(f"unexpected trainable_tokens_delta for {path}: the config's trainable_token_indices do not "
                    "select it" for path in sorted(set(tokens) - set(token_paths)))


def _shape_problem(model: nn.Module, name: str, held: torch.Tensor, have: torch.Tensor) -> str:
    """One line on a tensor of the wrong shape; for the token embeddings or the output head of a
    model whose vocabulary the adapter's training grew, what to do."""
    line = f"{name}: the file holds shape {tuple(held.shape)}, the model {tuple(have.shape)}"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and have.dim() == 2 and have.shape[0] == vocab and held.dim() == 2 \
            and held.shape[1] == have.shape[1]:
        tokens = held.shape[0]
        line += (f" (the adapter was trained with a vocabulary of {tokens} tokens, the model has {vocab}: resize "
                 f"the model's token embeddings first, model.resize_token_embeddings({tokens}))")
    return line


def _per_class(path: str, held: torch.Tensor, have: torch.Tensor, classes: int | None) -> bool:
    """Whether a task head's tensor is one row per class that differs only in how many classes: the
    head of a classifier adapter trained for labels of its own (or a regression's one output), which
    serving its own copy of the head lets share one base model with adapters of other label sets."""
    return (path.rsplit(".", 1)[-1] in CLASSIFIER_HEADS and classes is not None and have.shape[0] == classes
            and held.dim() == have.dim() and held.shape[1:] == have.shape[1:])


def _resize(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Give ``module``'s parameter ``key`` the shape of ``tensor`` (its values are loaded next)."""
    owner_path, _, pname = key.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    old = getattr(owner, pname)
    setattr(owner, pname, nn.Parameter(old.new_empty(tensor.shape), requires_grad=old.requires_grad))
    if isinstance(owner, nn.Linear) and pname == "weight":
        owner.out_features = tensor.shape[0]


def apply_plan(model: nn.Module, plan: LoadPlan, name: str) -> None:
    """Copy a validated plan's tensors into adapter ``name`` (just added) and the base."""
    modules = walk(model)
    with torch.no_grad():
        for path, A, B, magnitude, bias in plan.factors:
            adapter = modules[path].adapters[name]
            adapter.A.copy_(A)
            adapter.B.copy_(B)
            if magnitude is not None:
                adapter.magnitude.copy_(magnitude)
            if bias is not None:
                adapter.bias.copy_(bias)
        for path, state in plan.saved.items():
            for key in plan.resized.get(path, ()):
                _resize(modules[path].copies[name], key, state[key])
            modules[path].copies[name].load_state_dict(state, strict=True)
        for path, rows in plan.tokens.items():
            modules[path].copies[name].rows.copy_(rows)
        model_params = dict(model.named_parameters(remove_duplicate=False)) if plan.params else {}
        for pname, tensor in plan.params:
            param = model_params[pname]
            if torch.equal(param, tensor.to(param.dtype)):
                continue
            if not pname.endswith("bias"):
                warnings.warn(f"the adapter file replaces the base weight {pname} (PEFT saves full embeddings "
                              "it adapted, e.g. after the vocabulary was resized)", stacklevel=3)
            param.copy_(tensor)


def raise_misfit(model, source, metadata, tensors, problems):
    """Raise the one error for a file that does not fit, naming the architecture when it differs."""
    arch = metadata.get("lorakit_architecture")
    file_paths = factor_paths(tensors)
    head = f"adapter {source} does not fit {type(model).__name__}"
    if arch and arch != type(model).__name__:
        head = f"adapter {source} was made for {arch}, not for {type(model).__name__}"
    elif file_paths and not any(_has_module(model, p) for p in file_paths):
        head = (f"adapter {source} was made for another architecture: none of its {len(file_paths)} module paths "
                f"(e.g. {sorted(file_paths)[0]}) exist in {type(model).__name__}")
    elif metadata.get("lorakit_fingerprint") not in (None, model_fingerprint(model)):
        head += " (it was saved from a model with other parameter shapes)"
    listed = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise LorakitError(f"{head}; the model was not changed:\n  " + "\n  ".join(listed) + more)


def factor_paths(tensors: dict) -> set[str]:
    """The module paths a file holds LoRA factors for (its other tensors left out)."""
    return {parsed[0] for parsed in map(parse_factor_key, tensors) if parsed is not None}


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
