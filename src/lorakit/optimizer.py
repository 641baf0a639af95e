"""AdamW over the trainable parameters and its learning-rate schedule (warmup, then cosine).

Matrices get weight decay; biases and norm scales do not. The learning rate rises
linearly over the first ``warmup`` fraction of the steps, then follows a cosine down to
0 at the last step.
"""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: float,
                    total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on ``model``'s trainable parameters and its warmup-then-cosine schedule.

    Args:
        lr: the peak learning rate.
        warmup: fraction of ``total_steps`` spent rising to it.
    """
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
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
