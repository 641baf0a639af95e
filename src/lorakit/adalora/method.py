"""AdaLoRA as a training method: attach, allocate ranks each step, export a plain LoRA adapter.

Registered in :data:`lorakit.methods.METHODS` as ``"adalora"`` when this package is
imported. The saved adapter is an ordinary PEFT LoRA adapter: for each module with
kept directions K, ``B = s · P[:, K] · diag(λ_K) : (out, r_m)`` and ``A = Q[K] : (r_m, in)``
with ``lora_alpha = r_m`` (scaling 1), the ranks ``r_m`` in ``rank_pattern``; modules
left with no direction are dropped from ``target_modules``. It loads, merges and serves
like any LoRA adapter, in lorakit and in PEFT.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lorakit.adalora.allocator import RankAllocator
from lorakit.adalora.layer import AdaLoraLinear
from lorakit.errors import LorakitError

__all__ = ["ADALORA", "adalora_layers", "adalora_step", "adalora_to_lora", "attach_adalora", "default_target_rank"]

PEFT_PREFIX = "base_model.model."
_STATE = "_adalora_state"  # model attribute: {"init_rank", "target_rank", "heads", "allocator", ...}


def default_target_rank(init_rank: int) -> int:
    """The final average rank when none is given: a third of the initial one (12 -> 4), at least 1."""
    return max(1, init_rank // 3)


def adalora_layers(model: nn.Module) -> dict[str, AdaLoraLinear]:
    """Every :class:`AdaLoraLinear` of ``model`` by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, AdaLoraLinear)}


def _resolve_targets(model: nn.Module, targets) -> list[str]:
    from lorakit.analysis.weights import linear_weights
    from lorakit.config import name_matches
    from lorakit.model import DEFAULT_TARGETS

    linear = list(linear_weights(model))  # nn.Linear / Conv1D leaves, output heads left out
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = DEFAULT_TARGETS.get(model_type)
        if targets is None:
            raise LorakitError(f"no targets given and no default for model type {model_type!r}; "
                               f"name some of: {sorted({p.rsplit('.', 1)[-1] for p in linear})}")
    if targets == "all-linear":
        return linear
    paths = [p for p in linear if name_matches(targets, p)]
    if not paths:
        raise LorakitError(f"targets {targets!r} matched no linear layer of {type(model).__name__}; "
                           f"linear layers are named: {sorted({p.rsplit('.', 1)[-1] for p in linear})}")
    return paths


def attach_adalora(model: nn.Module, targets=None, init_rank: int = 12, target_rank: int | None = None,
                   alpha: float | None = None, orth_weight: float = 0.1, heads: list[str] | None = None,
                   grad_accum: int = 1) -> nn.Module:
    """Wrap ``targets`` in :class:`AdaLoraLinear` (rank ``init_rank``), freeze the rest but ``heads``.

    Args:
        targets: module names (``["query", "value"]``), a regex, ``"all-linear"``, or None
            for the model family's default (:data:`lorakit.model.DEFAULT_TARGETS`).
        init_rank: r of every layer at the start (the paper's initial budget per matrix).
        target_rank: average r at the end (default :func:`default_target_rank`).
        alpha: ``s = alpha / init_rank`` (default ``init_rank``: s = 1).
        orth_weight: γ of the orthogonality regularizer (AdaLoRA Eq. 4; the paper uses 0.1).
        heads: names of task-head modules trained in full and saved (``["classifier"]``).
        grad_accum: forward passes per optimizer step (the regularizer's gradient is
            divided by it, so it is added once per step).

    Returns:
        ``model``, changed in place; :func:`adalora_step` must then run after every optimizer step.
    """
    target_rank = target_rank or default_target_rank(init_rank)
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or not 1 <= target_rank <= init_rank:
        raise LorakitError(f"target rank must be an integer in [1, init rank {init_rank}], got {target_rank!r}")
    if adalora_layers(model):
        raise LorakitError("the model already holds AdaLoRA layers; load a fresh model")
    paths = _resolve_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
        setattr(parent, child, AdaLoraLinear(base, init_rank, alpha if alpha is not None else init_rank,
                                             orth_weight, 1.0 / grad_accum))
    for head in heads or []:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
    object.__setattr__(model, _STATE, {"init_rank": init_rank, "target_rank": target_rank,
                                       "heads": list(heads or []), "allocator": None})
    return model


def adalora_step(model: nn.Module, step: int, total_steps: int) -> int:
    """Run the rank allocator after optimizer step ``step`` (1-based) of ``total_steps``; returns b(step)."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise LorakitError("the model has no AdaLoRA layers; call attach_adalora first")
    if state["allocator"] is None or state["allocator"].total_steps != total_steps:
        state["allocator"] = RankAllocator(adalora_layers(model), state["target_rank"], total_steps)
    return state["allocator"].step(step)


@torch.no_grad()
def adalora_to_lora(model: nn.Module, base_model_name_or_path: str | None = None, task_type: str | None = None):
    """The model's AdaLoRA update as a plain LoRA adapter: ``(LoraConfig, tensors in PEFT keys)``.

    Each module keeps its directions with mask = 1 and λ ≠ 0; ``B = s·P_K·diag(λ_K)``,
    ``A = Q_K``, alpha = rank (scaling 1). Heads given to :func:`attach_adalora` are saved
    whole as ``modules_to_save``.

    Raises:
        LorakitError: the model has no AdaLoRA layer, or every direction was pruned.
    """
    from lorakit.config import LoraConfig

    layers = adalora_layers(model)
    if not layers:
        raise LorakitError("the model has no AdaLoRA layers to export")
    tensors, ranks, conv1d = {}, {}, False
    for path, layer in layers.items():
        keep = (layer.mask > 0) & (layer.lam != 0)
        r = int(keep.sum())
        if r == 0:
            continue
        ranks[path] = r
        conv1d = conv1d or layer.fan_in_fan_out
        B = (layer.P[:, keep].float() * layer.lam[keep].float()) * layer.scaling
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.Q[keep].float().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous()
    if not ranks:
        raise LorakitError("every AdaLoRA direction is pruned (all λ = 0); train for more steps")
    heads = getattr(model, _STATE, {}).get("heads", [])
    for head in heads:
        for key, value in model.get_submodule(head).state_dict().items():
            tensors[f"{PEFT_PREFIX}{head}.{key}"] = value.detach().float()
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {path: k for path, k in ranks.items() if k != r}
    config = LoraConfig(r=r, alpha=r, target_modules=list(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern),
                        modules_to_save=[h.rsplit(".", 1)[-1] for h in heads] or None, fan_in_fan_out=conv1d,
                        base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    return config, tensors


# ---------------------------------------------------------------- lorakit.train's method registry


def _prepare(model: nn.Module, config, heads: list[str]) -> nn.Module:
    init_rank = getattr(config, "init_rank", None) or config.rank
    target_rank = getattr(config, "target_rank", None) or default_target_rank(init_rank)
    return attach_adalora(model, config.targets, init_rank=init_rank, target_rank=target_rank, alpha=config.alpha,
                          heads=heads, grad_accum=config.grad_accum)


def _on_step(model: nn.Module, step: int, total_steps: int) -> None:
    adalora_step(model, step + 1, total_steps)  # lorakit.train passes the 0-based step just taken


def _export(model: nn.Module, tokenizer, folder: Path, config) -> None:
    from lorakit.io import write_adapter

    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    lora_config, tensors = adalora_to_lora(model, name, "SEQ_CLS" if getattr(model, _STATE)["heads"] else "CAUSAL_LM")
    state = getattr(model, _STATE)
    write_adapter(folder, lora_config, tensors, metadata={
        "lorakit_method": "adalora", "lorakit_init_rank": str(state["init_rank"]),
        "lorakit_target_rank": str(state["target_rank"])})


def _register():
    from lorakit.methods import METHODS, Method, register_method

    if "adalora" not in METHODS:
        register_method(Method("adalora", _prepare, _export, default_lr=2e-3, saved_name="adapter", on_step=_on_step))
    return METHODS["adalora"]


ADALORA = _register()
