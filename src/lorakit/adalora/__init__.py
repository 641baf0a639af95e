"""AdaLoRA (Zhang et al. 2023): the rank chosen during training (seed 003, "Emerging systematic methods").

- :mod:`lorakit.layers.adalora`: the layer kind, ``ΔW = s·P·diag(λ)·Q`` with the
  orthogonality regularizer, a :class:`~lorakit.layers.LoraLayer` like any other;
- :mod:`.allocator`: importance (sensitivity × uncertainty, EMA-smoothed) and the cubic budget;
- :mod:`.method`: attach, step, export as a plain LoRA adapter, and the hooks
  :mod:`lorakit.methods` registers as ``--method adalora``.
"""

from lorakit.adalora.allocator import RankAllocator, budget_at
from lorakit.adalora.method import (
    adalora_adapters, adalora_layers, adalora_step, adalora_to_lora, attach_adalora, default_target_rank,
)
from lorakit.layers.adalora import AdaLoraAdapter, AdaLoraLinear

__all__ = ["AdaLoraAdapter", "AdaLoraLinear", "RankAllocator", "adalora_adapters", "adalora_layers", "adalora_step",
           "adalora_to_lora", "attach_adalora", "budget_at", "default_target_rank"]
