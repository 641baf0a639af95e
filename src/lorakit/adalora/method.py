"""AdaLoRA as a training method: attach, allocate ranks each step, export a plain LoRA adapter.

An AdaLoRA adapter is an ordinary lorakit adapter whose layers are of kind ``"adalora"``
(:class:`~lorakit.layers.adalora.AdaLoraLinear`): :func:`attach_adalora` adds it with
:func:`lorakit.model.add_adapter`, so targets, freezing, ``modules_to_save`` (the task
head), merging, per-row batches and saving are LoRA's own. What AdaLoRA adds is the
budget: :func:`adalora_step` after every optimizer step (:mod:`.allocator`).

The saved adapter is an ordinary PEFT LoRA adapter: for each module with kept directions
K, ``A = Q[K] : (r_m, in)`` and ``B = P[:, K] · diag(λ_K) : (out, r_m)``, the ranks ``r_m``
in ``rank_pattern`` and ``s · r_m`` in ``alpha_pattern`` (so each module keeps its scaling
s); modules left with no direction are dropped from ``target_modules``. It loads, merges
and serves like any LoRA adapter, in lorakit and in PEFT.

:func:`prepare_adalora`, :func:`on_adalora_step`, :func:`export_adalora` and the checkpointed
state (:func:`adalora_state`, :func:`load_adalora_state`) are the
``--method adalora`` entry of :data:`lorakit.methods.METHODS`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.adalora.allocator import RankAllocator
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.io import adapter_state_dict, write_adapter
from lorakit.layers import AdaLoraAdapter, AdaLoraLinear
from lorakit.model import add_adapter, export_config, lora_configs, lora_layers, set_active

__all__ = ["adalora_adapters", "adalora_layers", "adalora_state", "adalora_step", "adalora_to_lora", "attach_adalora",
           "default_target_rank", "export_adalora", "load_adalora_state", "on_adalora_step", "prepare_adalora"]

_STATE = "_adalora_state"  # model attribute: {"name", "target_rank", "allocator"}


def default_target_rank(init_rank: int) -> int:
    """The final average rank when none is given: a third of the initial one (12 -> 4), at least 1."""
    return max(1, init_rank // 3)


def adalora_layers(model: nn.Module) -> dict[str, AdaLoraLinear]:
    """Every AdaLoRA layer of ``model`` by module path."""
    return {path: layer for path, layer in lora_layers(model) if isinstance(layer, AdaLoraLinear)}


def adalora_adapters(model: nn.Module, name: str | None = None) -> dict[str, AdaLoraAdapter]:
    """Adapter ``name``'s :class:`~lorakit.layers.adalora.AdaLoraAdapter` at each module, by path
    (``name`` None: the one :func:`attach_adalora` added)."""
    name = _state(model)["name"] if name is None else name
    return {path: layer.adapters[name] for path, layer in adalora_layers(model).items() if name in layer.adapters}


def _state(model: nn.Module) -> dict:
    state = getattr(model, _STATE, None)
    if state is None:
        raise LorakitError("the model has no AdaLoRA adapter; call attach_adalora first")
    return state


def attach_adalora(model: nn.Module, targets=None, init_rank: int = 12, target_rank: int | None = None,
                   alpha: float | None = None, orth_weight: float = 0.1, heads: list[str] | None = None,
                   grad_accum: int = 1, dropout: float = 0.0, task_type: str | None = None,
                   name: str = "default") -> nn.Module:
    """Add and activate AdaLoRA adapter ``name`` at ``targets`` (rank ``init_rank``); freeze the rest but ``heads``.

    Args:
        targets: module names (``["query", "value"]``), a regex, ``"all-linear"``, or None
            for the model family's default (:data:`lorakit.targets.DEFAULT_TARGETS`).
        init_rank: r of every layer at the start (the paper's initial budget per matrix).
        target_rank: average r at the end (default :func:`default_target_rank`).
        alpha: ``s = alpha / init_rank`` (default ``init_rank``: s = 1).
        orth_weight: γ of the orthogonality regularizer (AdaLoRA Eq. 4; the paper uses 0.1).
        heads: names of task-head modules trained in full and saved (``["classifier"]``):
            the adapter's ``modules_to_save``.
        grad_accum: forward passes per optimizer step (the regularizer's gradient is
            divided by it, so it is added once per step).
        dropout, task_type: as in :class:`~lorakit.config.LoraConfig`.

    Returns:
        ``model``, changed in place; :func:`adalora_step` must then run after every optimizer step.

    Raises:
        LorakitError: a rank out of range, targets AdaLoRA cannot wrap (it wraps nn.Linear
            and Conv1D), or the model holds an AdaLoRA adapter already.
    """
    target_rank = target_rank or default_target_rank(init_rank)
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or not 1 <= target_rank <= init_rank:
        raise LorakitError(f"target rank must be an integer in [1, init rank {init_rank}], got {target_rank!r}")
    held = sorted({n for layer in adalora_layers(model).values() for n in layer.adapters})
    if held:
        raise LorakitError(f"the model already holds AdaLoRA adapter(s) {held}; delete_adapter them or load a "
                           "fresh model")
    config = LoraConfig(r=init_rank, alpha=alpha if alpha is not None else init_rank, dropout=dropout,
                        target_modules=targets, modules_to_save=list(heads) if heads else None, task_type=task_type)
    add_adapter(model, config, name, kind="adalora")
    set_active(model, name)
    for adapter in adalora_adapters(model, name).values():
        adapter.orth_weight = float(orth_weight)
        adapter.grad_scale = 1.0 / grad_accum  # the penalty's gradient is added once per optimizer step
    object.__setattr__(model, _STATE, {"name": name, "target_rank": target_rank, "allocator": None})
    return model


def _allocator(model: nn.Module, total_steps: int) -> RankAllocator:
    state = _state(model)
    if state["allocator"] is None or state["allocator"].total_steps != total_steps:
        state["allocator"] = RankAllocator(adalora_adapters(model), state["target_rank"], total_steps)
    return state["allocator"]


def adalora_step(model: nn.Module, step: int, total_steps: int) -> int:
    """Run the rank allocator after optimizer step ``step`` (1-based) of ``total_steps``; returns b(step)."""
    return _allocator(model, total_steps).step(step)


@torch.no_grad()
def adalora_to_lora(model: nn.Module, base_model_name_or_path: str | None = None, task_type: str | None = None,
                    name: str | None = None):
    """AdaLoRA adapter ``name``'s update as a plain LoRA adapter: ``(LoraConfig, tensors in PEFT keys)``.

    The tensors and ranks :func:`lorakit.io.save_adapter` writes: each module keeps its
    directions with mask = 1 and λ ≠ 0, ``A = Q_K``, ``B = P_K·diag(λ_K)``, its rank in
    ``rank_pattern`` and ``alpha = s·rank`` in ``alpha_pattern`` (the scaling s unchanged);
    modules with none left are dropped (:func:`lorakit.model.export_config`). The heads
    given to :func:`attach_adalora` are saved whole as ``modules_to_save``; the config says
    ``fan_in_fan_out`` when the layers wrap Conv1D (PEFT would otherwise set it with a warning).

    Raises:
        LorakitError: the model has no AdaLoRA adapter, or every direction was pruned.
    """
    name = _state(model)["name"] if name is None else name
    layers = [layer for layer in adalora_layers(model).values() if name in layer.adapters]
    if not layers:
        raise LorakitError(f"the model has no AdaLoRA adapter {name!r} to export")
    config = export_config(model, name)
    config = config.replace(fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers),
                            base_model_name_or_path=base_model_name_or_path or config.base_model_name_or_path,
                            task_type=task_type or config.task_type)
    tensors = {key: tensor.detach().float() for key, tensor in adapter_state_dict(model, name).items()}
    return config, tensors


# ---------------------------------------------------------------- --method adalora (lorakit.methods)


def prepare_adalora(model: nn.Module, config, heads: list[str]) -> nn.Module:
    """Attach AdaLoRA as a :class:`lorakit.train.TrainConfig` says (``init_rank``, ``target_rank``, ...)."""
    init_rank = config.init_rank or config.rank
    return attach_adalora(model, config.targets, init_rank=init_rank,
                          target_rank=config.target_rank or default_target_rank(init_rank), alpha=config.alpha,
                          heads=heads, grad_accum=config.grad_accum, dropout=config.lora_dropout,
                          name=config.adapter_name)


def on_adalora_step(model: nn.Module, step: int, total_steps: int) -> None:
    adalora_step(model, step + 1, total_steps)  # lorakit.train passes the 0-based step just taken


def adalora_state(model: nn.Module, total_steps: int) -> dict[str, torch.Tensor]:
    """The allocator's state for a checkpoint (:meth:`RankAllocator.state_dict`)."""
    return _allocator(model, total_steps).state_dict()


def load_adalora_state(model: nn.Module, tensors: dict[str, torch.Tensor], total_steps: int) -> None:
    """Restore :func:`adalora_state` (a checkpoint written before it was kept has none: the
    allocator then starts afresh, as it did)."""
    if tensors:
        _allocator(model, total_steps).load_state_dict(tensors)


def export_adalora(model: nn.Module, tokenizer, folder: Path, config) -> None:
    """Write the trained AdaLoRA adapter into ``folder`` as a plain LoRA adapter."""
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    lora_config, tensors = adalora_to_lora(model, base, name=config.adapter_name)
    state = _state(model)
    write_adapter(folder, lora_config, tensors, metadata={
        "lorakit_method": "adalora", "lorakit_init_rank": str(lora_configs(model)[config.adapter_name].r),
        "lorakit_target_rank": str(state["target_rank"])})
