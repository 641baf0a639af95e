"""Combine several adapters into a new one, mathematically right (``lorakit.combine``).

Named ``combination`` so the module does not shadow the function ``lorakit.combine``.

Given adapters ``i`` with ``ΔW_i = s_i B_i A_i`` and weights ``w_i``, the target is
``ΔW = Σ w_i ΔW_i`` at every layer:

- ``"cat"``: exact. ``A = [A_1; A_2; …]`` stacked on the rank axis and
  ``B = [w_1 s_1 B_1, w_2 s_2 B_2, …]``, scaling 1, so ``B A = Σ w_i s_i B_i A_i``;
  the ranks add up.
- ``"svd"``: ``Σ w_i ΔW_i`` truncated to rank r by its SVD (``lorakit.lowrank``): the best
  rank-r approximation (Eckart–Young), ``B = U_r √S_r``, ``A = √S_r V_rᵀ``.

Mixing the factors linearly (``A = Σ w_i A_i``, ``B = Σ w_i B_i``, PEFT's ``"linear"``)
is not either of these: ``B A`` then holds cross terms ``w_i w_j B_i A_j`` (PEFT issue 3004).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.layers import LoraLayer
from lorakit.lowrank import truncated_svd
from lorakit.model import add_adapter, lora_configs, lora_layers

# method -> fn(layer, weights, rank) -> (A: (r', in), B: (out, r')) with scaling 1
CombineFn = Callable[[LoraLayer, dict, "int | None"], "tuple[torch.Tensor, torch.Tensor]"]
COMBINE_METHODS: dict[str, CombineFn] = {}


def register_combine(name: str):
    """Decorator: register a combination rule under ``name`` (``combine(..., method=name)``)."""

    def add(fn: CombineFn) -> CombineFn:
        COMBINE_METHODS[name] = fn
        return fn

    return add


@register_combine("cat")
def _cat(layer: LoraLayer, weights: dict, rank) -> tuple[torch.Tensor, torch.Tensor]:
    ads = [(layer.adapters[n], w) for n, w in weights.items() if n in layer.adapters]
    A = torch.cat([ad.A.detach().float() for ad, _ in ads], dim=0)
    B = torch.cat([ad.B.detach().float() * (w * ad.scaling) for ad, w in ads], dim=1)
    return A, B


@register_combine("svd")
def _svd(layer: LoraLayer, weights: dict, rank) -> tuple[torch.Tensor, torch.Tensor]:
    ads = [(layer.adapters[n], w) for n, w in weights.items() if n in layer.adapters]
    delta = sum(ad.delta() * w for ad, w in ads)  # (out, in) fp32
    r = rank if rank is not None else max(ad.r for ad, _ in ads)
    r = min(r, *delta.shape)
    if not bool(delta.abs().max() > 0):  # all-zero ΔW (e.g. untrained adapters): SVD is meaningless
        return torch.zeros(r, delta.shape[1]), torch.zeros(delta.shape[0], r)
    U, S, Vh = truncated_svd(delta, r)
    root = S.sqrt()
    return root[:, None] * Vh, U * root[None, :]


def combine(model: nn.Module, weights: dict[str, float], method: str = "cat", name: str = "combined",
            rank: int | None = None) -> nn.Module:
    """Add adapter ``name`` whose ``ΔW`` is ``Σ w_i ΔW_i`` (``cat``: exactly; ``svd``: best rank-r).

    Args:
        weights: adapter name -> weight ``w_i`` (any real number).
        method: a registered rule, ``"cat"`` or ``"svd"``.
        rank: ``svd`` only; defaults to the largest rank among the inputs at each layer.

    The new adapter targets the layers that hold any of the inputs (missing inputs count
    as ΔW = 0), has scaling 1 (``alpha = r``), and is added, not activated.

    Returns:
        ``model`` itself.

    Raises:
        LorakitError: unknown method or adapter, empty weights, a taken name, or ``rank``
            given with ``cat``.
    """
    if method not in COMBINE_METHODS:
        raise LorakitError(f"combine method {method!r} is unknown; choose one of {sorted(COMBINE_METHODS)}")
    if not weights:
        raise LorakitError("combine needs at least one adapter weight, e.g. {'sql': 0.5, 'chat': 0.5}")
    configs = lora_configs(model)
    unknown = [n for n in weights if n not in configs]
    if unknown:
        raise LorakitError(f"unknown adapter(s) {unknown}; the model has {sorted(configs) or 'none'}")
    if name in configs:
        raise LorakitError(f"model already has an adapter {name!r}; pick another name for the combination")
    if rank is not None and method == "cat":
        raise LorakitError("rank applies to method='svd' only; 'cat' keeps the sum of the ranks")
    weights = {n: float(w) for n, w in weights.items()}

    factors = {path: COMBINE_METHODS[method](layer, weights, rank)
               for path, layer in lora_layers(model) if any(n in layer.adapters for n in weights)}
    ranks = {path: A.shape[0] for path, (A, _) in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    odd = {path: k for path, k in ranks.items() if k != r}
    first = configs[next(iter(weights))]
    config = first.replace(
        r=r, alpha=r, use_rslora=False, init="gaussian", dropout=first.dropout,
        target_modules=sorted(factors), exclude_modules=None, modules_to_save=None,
        rank_pattern={_exact(p): k for p, k in odd.items()}, alpha_pattern={_exact(p): k for p, k in odd.items()},
    )
    add_adapter(model, config, name)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if path in factors:
                A, B = factors[path]
                ad = layer.adapters[name]
                ad.A.copy_(A)
                ad.B.copy_(B)
    return model


def _exact(path: str) -> str:
    """A rank_pattern key that matches this path (PEFT matches keys as ``(.*\\.)?(key)$``)."""
    return path.replace(".", r"\.")
