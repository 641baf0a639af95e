"""Adapters whose init rewrote the base weight (PiSSA, OLoRA), saved to apply to the original W.

Such an init starts from factors ``B0: (out, r)``, ``A0: (r, in)`` taken from W itself and
replaces the frozen weight by the residual ``W_res = W − s·B0·A0``, so the model is unchanged
at step 0. After training the layer computes ``W_res + s·B·A = W + s·(B·A − B0·A0)``: against
the original W the update is

    ΔW = s·(B·A − B0·A0) = s · [B, −B0] · [A; A0]

a LoRA adapter of rank 2r with the same scaling: ``A' = [A; A0] : (2r, in)``,
``B' = [B, −B0] : (out, 2r)``, ``r' = 2r`` and alpha doubled (√2 times with rsLoRA, whose
scaling is ``alpha/√r``), ``rank_pattern`` and ``alpha_pattern`` likewise. This is the
conversion PEFT offers at save time (``save_pretrained(path_initial_model_for_weight_conversion=...)``),
and what :func:`lorakit.io.save_adapter` writes by default: the file loads onto the
unmodified base model, in lorakit and in PEFT (``init_lora_weights: true``).

``B0`` and ``A0`` are the buffers :func:`lorakit.inits.keep_initial_factors` left on the
adapter when the init ran (not saved in any state dict); an adapter loaded from a file has
none and is saved as it is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inits import initial_factors
from lorakit.peft_format import factor_key
from lorakit.targets import lora_layers


def to_original_base(model: nn.Module, name: str, config: LoraConfig,
                     tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Adapter ``name``'s ``config`` and ``tensors`` (PEFT keys, as ``adapter_state_dict`` gives
    them) converted to apply to the original base weights, when its init rewrote them; else
    returned as they are.

    Returns:
        ``(config, tensors)``: rank doubled, alpha adjusted so every scaling is unchanged, init
        ``"kaiming"`` (PEFT's ``true``), and ``[A; A0]``, ``[B, −B0]`` in place of A and B (a new dict).

    Raises:
        LorakitError: some of the adapter's layers kept their initial factors and others did not.
    """
    converted = dict(tensors)
    kept, lacking = [], []
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        initial = initial_factors(layer.adapters[name])
        if initial is None:
            lacking.append(path)
            continue
        kept.append(path)
        A0, B0 = initial
        key_a, key_b = factor_key(path, "A", layer.is_embedding), factor_key(path, "B", layer.is_embedding)
        A, B = tensors[key_a].detach(), tensors[key_b].detach()  # a convolution's: kernels
        converted[key_a] = torch.cat([A, A0.to(A.dtype).reshape(-1, *A.shape[1:])], dim=0)
        converted[key_b] = torch.cat([B, -B0.to(B.dtype).reshape(B.shape[0], -1, *B.shape[2:])], dim=1)
    if not kept:
        return config, tensors
    if lacking:
        raise LorakitError(f"adapter {name!r} kept its initial factors at {kept[0]} but not at {lacking[0]}; "
                           "it cannot be converted to the original base: save it with original_base=False")
    factor = math.sqrt(2) if config.use_rslora else 2
    config = config.replace(
        r=2 * config.r, alpha=config.alpha * factor, init="kaiming",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )
    return config, converted
