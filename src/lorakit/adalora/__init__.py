"""AdaLoRA (Zhang et al. 2023): the rank chosen during training (seed 003, "Emerging systematic methods").

- :mod:`.layer`: ``ΔW = s·P·diag(λ)·Q`` on a linear layer, with the orthogonality regularizer;
- :mod:`.allocator`: importance (sensitivity × uncertainty, EMA-smoothed) and the cubic budget;
- :mod:`.method`: attach, step, export as a plain LoRA adapter, and the ``adalora`` training method.

Importing this package registers ``--method adalora`` in :data:`lorakit.methods.METHODS`.
"""

from lorakit.adalora.allocator import RankAllocator, budget_at
from lorakit.adalora.layer import AdaLoraLinear
from lorakit.adalora.method import adalora_layers, adalora_step, adalora_to_lora, attach_adalora, default_target_rank

__all__ = ["AdaLoraLinear", "RankAllocator", "adalora_layers", "adalora_step", "adalora_to_lora", "attach_adalora",
           "budget_at", "default_target_rank"]
