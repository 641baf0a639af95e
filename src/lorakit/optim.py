"""LoRA+ (Hayou, Ghosh & Yu 2024): B learns ``ratio`` times faster than A.

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

from torch import nn

from lorakit.errors import LorakitError
from lorakit.targets import lora_layers


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
