"""PEFT's adapter layout, and matching a file's tensors to a model before loading them.

Keys as PEFT 0.21 writes them (the adapter name never appears)::

    base_model.model.<path>.lora_A.weight          (r, in_features)      nn.Linear, Conv1D
    base_model.model.<path>.lora_B.weight          (out_features, r)
    base_model.model.<path>.lora_embedding_A       (r, num_embeddings)   nn.Embedding
    base_model.model.<path>.lora_embedding_B       (embedding_dim, r)
    base_model.model.<saved path>.<param>          modules_to_save, full (e.g. classifier.weight)
    base_model.model.<path>.base_layer.bias        bias="lora_only"/"all", of a LoRA layer
    base_model.model.<path>.bias                   bias="all", elsewhere
    base_model.model.<path>.base_layer.weight      the full embedding, when one is targeted

:func:`plan_load` checks every tensor against the model and raises one
:class:`~lorakit.errors.LorakitError` listing every problem; only then does
:func:`apply_plan` write into the model. Used by :func:`lorakit.io.load_adapter`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError

PREFIX = "base_model.model."
FACTOR_SUFFIXES = {  # key suffix -> (factor, embedding?)
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}
_MAX_LISTED = 20


def factor_key(path: str, factor: str, embedding: bool) -> str:
    """PEFT's key of factor ``"A"`` or ``"B"`` of the adapter at module ``path``."""
    return f"{PREFIX}{path}.lora_embedding_{factor}" if embedding else f"{PREFIX}{path}.lora_{factor}.weight"


def parse_factor_key(key: str):
    """``(module path, "A" | "B", is_embedding)`` for a LoRA factor key, else None."""
    if not key.startswith(PREFIX):
        return None
    for suffix, (factor, embedding) in FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], factor, embedding
    return None


@dataclass
class LoadPlan:
    """Where each validated tensor of a file goes.

    Attributes:
        factors: ``(module path, A: (r, in), B: (out, r))`` per targeted module.
        saved: modules_to_save path -> its state dict from the file.
        params: ``(parameter name, tensor)`` written into the base model (biases, and
            full embeddings PEFT saves).
    """

    factors: list = field(default_factory=list)
    saved: dict = field(default_factory=dict)
    params: list = field(default_factory=list)


def plan_load(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], name: str,
              source, metadata: dict[str, str]) -> LoadPlan:
    """Match every tensor to its place in ``model`` without changing the model.

    Raises:
        LorakitError: anything does not fit; the message lists every missing or
            unexpected key and every shape mismatch with its module path.
    """
    from lorakit.model import saved_paths, target_paths, walk

    modules = walk(model)
    try:
        targets = target_paths(model, config, modules)
        saved = saved_paths(model, config, modules)
    except LorakitError as err:
        raise_misfit(model, source, metadata, tensors, [str(err)])
    problems: list[str] = []
    plan = LoadPlan(saved={p: {} for p in saved})
    factors = _sort_keys(model, tensors, plan, problems)
    plan.factors = _check_factors(model, modules, config, name, targets, factors, problems)
    _check_saved(modules, plan.saved, problems)
    if problems:
        raise_misfit(model, source, metadata, tensors, problems)
    return plan


def _sort_keys(model, tensors, plan: LoadPlan, problems: list[str]) -> dict:
    """Factors by module path (returned); saved-module and base tensors into ``plan``."""
    factors: dict[str, dict] = {}
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
        local = key[len(PREFIX):]
        if ".original_module." in local or ".modules_to_save." in local:
            continue  # PEFT's wrapper internals (bias="all"): duplicates of keys it also writes plainly
        owner = next((p for p in plan.saved if local.startswith(p + ".")), None)
        if owner is not None:
            plan.saved[owner][local[len(owner) + 1:]] = tensor
            continue
        pname = local.replace(".base_layer.", ".")
        if model_params is None:
            model_params = dict(model.named_parameters(remove_duplicate=False))
        if pname not in model_params:
            problems.append(f"unexpected key {key}: the model has no parameter {pname}")
        elif tuple(tensor.shape) != tuple(model_params[pname].shape):
            problems.append(f"{pname}: the file holds shape {tuple(tensor.shape)}, "
                            f"the model {tuple(model_params[pname].shape)}")
        else:
            plan.params.append((pname, tensor))
    return factors


def _check_factors(model, modules, config, name, targets, factors, problems) -> list:
    planned = []
    for path in targets:
        found = factors.pop(path, {})
        in_f, out_f, embedding = factor_dims(modules[path])
        r = config.rank_for(path)
        if "A" not in found or "B" not in found:
            kind = "lora_embedding_" if embedding else "lora_"
            problems.append(f"missing {' and '.join(kind + f for f in 'AB' if f not in found)} for {path}")
            continue
        (A, a_emb), (B, b_emb) = found["A"], found["B"]
        if a_emb != embedding or b_emb != embedding:
            have, want = ("an embedding", "a linear layer") if embedding else ("a linear layer", "an embedding")
            problems.append(f"{path} is {have} in the model but the file stores it as {want}")
        elif A.ndim != 2 or B.ndim != 2:
            problems.append(f"{path}: A and B must be matrices, the file holds {tuple(A.shape)} and {tuple(B.shape)}")
        elif A.shape[0] != r or B.shape[1] != r:
            problems.append(f"adapter {name!r} has rank {r} but the file holds rank {A.shape[0]} for {path}")
        elif tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            problems.append(f"{path}: the file holds A {tuple(A.shape)} and B {tuple(B.shape)}, the model's layer "
                            f"needs A {(r, in_f)} and B {(out_f, r)}")
        else:
            planned.append((path, A, B))
    for path in sorted(factors):
        why = "the config's target_modules do not select it" if _has_module(model, path) else "the model has no such module"
        problems.append(f"unexpected LoRA factors for {path}: {why}")
    return planned


def _check_saved(modules, saved: dict, problems: list[str]) -> None:
    for path, state in saved.items():
        module = modules[path]
        want = (module.original() if hasattr(module, "copies") else module).state_dict()
        problems.extend(f"missing modules_to_save weight {path}.{k}" for k in sorted(set(want) - set(state)))
        problems.extend(f"unexpected modules_to_save weight {path}.{k}" for k in sorted(set(state) - set(want)))
        problems.extend(f"{path}.{k}: the file holds shape {tuple(state[k].shape)}, the model {tuple(want[k].shape)}"
                        for k in sorted(set(state) & set(want)) if state[k].shape != want[k].shape)


def apply_plan(model: nn.Module, plan: LoadPlan, name: str) -> None:
    """Copy a validated plan's tensors into adapter ``name`` (just added) and the base."""
    from lorakit.model import walk

    modules = walk(model)
    with torch.no_grad():
        for path, A, B in plan.factors:
            adapter = modules[path].adapters[name]
            adapter.A.copy_(A)
            adapter.B.copy_(B)
        for path, state in plan.saved.items():
            modules[path].copies[name].load_state_dict(state, strict=True)
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
    from lorakit.models import model_fingerprint

    arch = metadata.get("lorakit_architecture")
    file_paths = {parsed[0] for parsed in map(parse_factor_key, tensors) if parsed is not None}
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


def factor_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, is_embedding)`` of the adapter ``layer`` would hold."""
    from lorakit.layers import LoraLayer

    if isinstance(layer, LoraLayer):
        return layer.in_features, layer.out_features, layer.is_embedding
    if isinstance(layer, nn.Embedding):
        num, dim = layer.weight.shape
        return num, dim, True
    if type(layer).__name__ == "Conv1D":  # transformers' Conv1D: weight (in, out)
        in_f, out_f = layer.weight.shape
        return in_f, out_f, False
    if isinstance(layer, nn.Linear):  # a quantized subclass (bitsandbytes) packs its weight
        return layer.in_features, layer.out_features, False
    out_f, in_f = layer.weight.shape
    return in_f, out_f, False


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
