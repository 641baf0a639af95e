"""How a model is made trainable, and how the trained result is saved: a small registry.

``--method lora`` attaches a LoRA adapter (seeds 002-004: the pretrained weights frozen,
only A and B trained, plus a classifier head when the task has one) and saves it in
PEFT's format; ``--method full`` trains every weight and saves a whole model folder
that ``from_pretrained`` loads; ``--method adalora`` (:mod:`lorakit.adalora`) prunes ranks
during training and saves a plain LoRA adapter with the ranks it kept in ``rank_pattern``.
The three are registered at the end of this module; another method registers a
:class:`Method` under its name with :func:`register_method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lorakit.adalora.method import (
    adalora_state, export_adalora, load_adalora_state, on_adalora_step, prepare_adalora,
)
from lorakit.errors import LorakitError


@dataclass(frozen=True)
class Method:
    """One way of fine-tuning.

    Attributes:
        name: the ``--method`` value.
        prepare: ``(model, config, heads) -> model``: make the right parameters
            trainable; ``heads`` are the module names of a task head trained in full
            (``["classifier"]``), ``config`` a :class:`lorakit.train.TrainConfig`.
        export: ``(model, tokenizer, folder, config)``: write the trained result into
            the (empty, temporary) ``folder``.
        default_lr: the learning rate when ``--lr`` is not given.
        short_run_lr: the rate in its place when the recipe shortens the run because its steps
            compute in fp32 (``Task.fp32_epochs``): a shorter schedule takes a higher peak rate
            (measured for LoRA on the default task, docs/training.md); None: ``default_lr``.
        saved_name: the folder name under ``--out`` (``adapter`` or ``model``).
        on_step: optional ``(model, step, total_steps)`` called after every optimizer
            step (an adaptive-rank method updates its budget there).
        frozen_in_bf16: under bf16 mixed precision, store the parameters it leaves
            frozen in bf16 (they never change, so they need no fp32 copy).
        shardable: it trains with ``--fsdp`` (each process holding a slice of every
            parameter); False when ``on_step`` needs whole tensors.
        state: optional ``(model, total_steps) -> {name: tensor}``: what ``on_step`` keeps
            beyond the trainable parameters (AdaLoRA's importance and masks), saved in each
            checkpoint; ``load_state``: ``(model, tensors, total_steps)`` restores it on resume.
    """

    name: str
    prepare: Callable
    export: Callable
    default_lr: float
    saved_name: str
    on_step: Callable | None = None
    short_run_lr: float | None = None
    frozen_in_bf16: bool = False
    shardable: bool = True
    state: Callable | None = None
    load_state: Callable | None = None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` available as ``--method <method.name>``."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LorakitError(f"method {name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name]


def head_modules(model: nn.Module) -> list[str]:
    """The task-head modules trained in full: :func:`lorakit.targets.task_heads`."""
    from lorakit.targets import task_heads

    return task_heads(model)


# ---------------------------------------------------------------- lora


def _prepare_lora(model: nn.Module, config, heads: list[str]) -> nn.Module:
    from lorakit.config import LoraConfig
    from lorakit.model import attach

    saved = [*heads, *(name for name in config.modules_to_save or () if name not in heads)]
    lora_config = LoraConfig(
        r=config.rank, alpha=config.alpha, dropout=config.lora_dropout, init=config.init, target_modules=config.targets,
        modules_to_save=saved or None, task_type="SEQ_CLS" if heads else "CAUSAL_LM", use_dora=config.dora,
        use_rslora=config.rslora,
        layers_to_transform=config.layers_to_transform, trainable_token_indices=config.trainable_tokens,
        lora_bias=config.lora_bias, bias=config.bias, target_parameters=config.target_parameters,
    )
    unsaved = LoraConfig(modules_to_save=config.modules_to_save).unsaved_names(n for n, _ in model.named_modules())
    if unsaved:
        raise LorakitError(f"--modules-to-save {','.join(unsaved)} matched no module of {type(model).__name__}; "
                           "name modules lorakit inspect lists (or the ends of their paths), e.g. lm_head")
    return attach(model, lora_config, config.adapter_name)


def _export_lora(model: nn.Module, tokenizer, folder: Path, config) -> None:
    from lorakit.io import save_adapter

    save_adapter(model, folder, config.adapter_name)


# ---------------------------------------------------------------- full fine-tuning


def _prepare_full(model: nn.Module, config, heads: list[str]) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _export_full(model: nn.Module, tokenizer, folder: Path, config) -> None:
    model.save_pretrained(folder)  # config.json + model.safetensors
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- the built-in methods

register_method(Method("lora", _prepare_lora, _export_lora, default_lr=1e-3, saved_name="adapter",
                       frozen_in_bf16=True, short_run_lr=1.5e-3))
register_method(Method("full", _prepare_full, _export_full, default_lr=1e-4, saved_name="model"))
register_method(Method("adalora", prepare_adalora, export_adalora, default_lr=2e-3, saved_name="adapter",
                       on_step=on_adalora_step, shardable=False, state=adalora_state,
                       load_state=load_adalora_state))


def frozen_to_bf16(model) -> None:
    """Store the parameters that do not train in bfloat16: under bf16 autocast every
    product reads them in bf16 anyway, and weights that never change need no fp32 master
    copy. Halves the frozen model's memory, and no per-step bf16 casts of them are kept
    for the backward pass. Trainable parameters (adapter, head) stay fp32, and so do the
    frozen ones of a module that also trains one (a LayerNorm whose bias trains under
    ``--bias all``: its kernel takes one dtype)."""
    with torch.no_grad():
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if any(p.requires_grad for p in own):
                continue
            for p in own:
                if p.is_floating_point() and p.dtype != torch.bfloat16:
                    p.data = p.data.to(torch.bfloat16)
