"""AdamW over the trainable parameters and its learning-rate schedule (warmup, then cosine).

Matrices get weight decay; biases and norm scales do not. The learning rate rises
linearly over the first ``warmup`` fraction of the steps, then follows a cosine down to
0 at the last step.

LoRA+ (Hayou, Ghosh & Yu 2024, ``--loraplus-ratio``): B learns ``ratio`` times faster than A.

With A and B on one learning rate, the update of ``ΔW = s·B·A`` is dominated by A's
step in wide layers; the paper sets ``η_B = λ·η_A`` with λ ≫ 1 (it suggests 2⁴). The
parameter groups follow PEFT's ``create_loraplus_optimizer`` (and the paper's code):

- ``A`` of every LoRA layer, and every other trainable matrix (a ``modules_to_save`` head's
  weight): ``lr``, with weight decay;
- ``B`` of every LoRA layer: ``lr · ratio``, with weight decay;
- every other trainable vector (biases, norm scales, a head's bias): ``lr · ratio``, without
  weight decay (PEFT leaves weight decay on vectors that are neither a bias nor in a
  LayerNorm, e.g. an RMSNorm scale; here no vector decays, as in lorakit's plain groups);
- both factors of a LoRA embedding: ``lr_embedding`` (an absolute rate, 1e-6 by default as
  PEFT's ``loraplus_lr_embedding``), with weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.targets import lora_layers


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: float,
                    total_steps: int, loraplus_ratio: float | None = None,
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on ``model``'s trainable parameters and its warmup-then-cosine schedule.

    Args:
        lr: the peak learning rate.
        warmup: fraction of ``total_steps`` spent rising to it.
        loraplus_ratio: LoRA+ (:func:`loraplus_param_groups`): B's learning rate this times
            A's; None: one learning rate.
    """
    groups = param_groups(model, weight_decay) if loraplus_ratio is None else \
        loraplus_param_groups(model, lr, loraplus_ratio, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup_steps = round(warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps))
    return optimizer, scheduler


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: linear 0 -> 1 over ``warmup_steps``, then a
    cosine from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: matrices with weight decay, biases and norm scales without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6) -> list[dict]:
    """AdamW parameter groups of LoRA+ for ``model``'s trainable parameters (see the module docstring).

    Args:
        lr: A's learning rate (η_A).
        ratio: η_B / η_A (> 0; the paper uses 2 to 2⁸).
        weight_decay: decoupled weight decay of the matrices' groups.
        lr_embedding: the learning rate of LoRA embedding factors.

    Returns:
        four groups, ``{"params", "lr", "weight_decay", "name"}``: ``"A"``, ``"embedding"``,
        ``"B"``, ``"B_no_decay"`` (some may be empty), in PEFT's order. A scheduler such as
        ``LambdaLR`` scales each group's own lr.

    Raises:
        LorakitError: ``ratio`` or ``lr_embedding`` not a positive number.
    """
    for what, value in (("loraplus ratio", ratio), ("loraplus embedding lr", lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LorakitError(f"{what} must be a positive number, got {value!r}; LoRA+ suggests a ratio of 16")
    b_factors, embedding = set(), set()
    for _, layer in lora_layers(model):
        for adapter in layer.adapters.values():
            if layer.is_embedding:
                embedding.update((id(adapter.A), id(adapter.B)))
            else:
                b_factors.add(id(adapter.B))
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups["embedding"].append(param)
        elif id(param) in b_factors:
            groups["B"].append(param)
        elif param.ndim == 1:
            groups["B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    rates = {"A": lr, "embedding": lr_embedding, "B": lr * ratio, "B_no_decay": lr * ratio}
    return [{"params": params, "lr": rates[name], "weight_decay": 0.0 if name == "B_no_decay" else weight_decay,
             "name": name} for name, params in groups.items()]
