"""How strongly ΔW amplifies directions of W: the amplification factor of LoRA §7.3.

LoRA paper §7.3 and Table 7 (seed 002, "Connection between ΔW and W"): project W onto
the r-dimensional subspaces of ΔW, ``‖Uᵀ W V‖_F`` with ``U: (out, r)``, ``V: (in, r)``
ΔW's top-r left/right singular vectors, and compare it with the same projection onto

- W's own top-r singular directions (= sqrt(σ_1(W)² + … + σ_r(W)²), the most W can give),
- a random r-dimensional pair of subspaces (what no correlation gives).

The amplification factor is ``‖ΔW‖_F / ‖Uᵀ W V‖_F``: how much larger ΔW is along its
directions than W was. The paper found ΔW correlated with W more than a random matrix,
but along directions W does not emphasise, with a factor of about 21.5 at r = 4 (GPT-3
layer 48, W_q). A ΔW that is W's own top-r part has factor exactly 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lowrank import as_matrix, check_rank

__all__ = ["Amplification", "adapter_amplification", "amplification", "random_orthonormal"]


class Amplification(NamedTuple):
    """Table 7 of the LoRA paper for one weight matrix.

    All norms are Frobenius norms, in the units of the weights.
    """

    rank: int  # r: how many directions are compared
    delta_norm: float  # ‖ΔW‖_F
    weight_norm: float  # ‖W‖_F
    along_delta: float  # ‖Uᵀ W V‖_F, U, V: top-r singular vectors of ΔW
    along_weight: float  # the same for W's own top-r singular vectors
    along_random: float  # the same for random orthonormal U, V (one seeded draw, as the paper)
    shape: tuple[int, int] = (0, 0)  # (out, in) of W

    @property
    def factor(self) -> float:
        """‖ΔW‖_F / ‖Uᵀ W V‖_F with ΔW's directions (inf when W is zero there)."""
        return self.delta_norm / self.along_delta if self.along_delta > 0 else float("inf")

    @property
    def expected_random(self) -> float:
        """sqrt(E‖UᵀWV‖_F²) = r·‖W‖_F / sqrt(out·in) over uniformly random r-dim U, V: the noise-free baseline."""
        out, inp = self.shape
        return self.rank * self.weight_norm / (out * inp) ** 0.5 if out and inp else float("nan")

    @property
    def over_random(self) -> float:
        """‖Uᵀ W V‖_F along ΔW over along random directions: > 1 means ΔW correlates with W."""
        return self.along_delta / self.along_random if self.along_random > 0 else float("inf")


def random_orthonormal(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, r)`` with orthonormal columns spanning a uniformly random r-dim subspace (QR of a Gaussian)."""
    Q, R = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # sign fix: Haar-distributed


def amplification(delta_w, W, r: int, seed: int = 0) -> Amplification:
    """The amplification measures of LoRA Table 7 for ``ΔW`` against ``W``.

    Args:
        delta_w: ``ΔW: (out, in)`` (e.g. ``s·B·A`` of an adapter).
        W: the frozen base weight ``(out, in)``, same layout as ``delta_w``.
        r: number of leading directions, 1 ≤ r ≤ min(out, in); the paper uses the
            adapter's rank (4 or 64).
        seed: seed of the random subspaces of the baseline.

    Returns:
        :class:`Amplification`; ``.factor`` is ‖ΔW‖_F / ‖Uᵀ W V‖_F.

    Raises:
        LorakitError: shapes differ, r out of range, or a matrix is not finite.
    """
    d = as_matrix(delta_w, "delta_w").double()
    w = as_matrix(W, "W").double().to(d.device)
    if d.shape != w.shape:
        raise LorakitError(
            f"delta_w is {tuple(d.shape)} but W is {tuple(w.shape)}; give both in the same (out, in) layout"
        )
    r = check_rank(r, *d.shape, name="r")
    U, _, Vh = torch.linalg.svd(d, full_matrices=False)
    along_delta = torch.linalg.matrix_norm(U[:, :r].T @ w @ Vh[:r].T)
    sigma_w = torch.linalg.svdvals(w)
    along_weight = sigma_w[:r].square().sum().sqrt()
    gen = torch.Generator().manual_seed(int(seed))
    Ur = random_orthonormal(d.shape[0], r, gen).to(d.device)
    Vr = random_orthonormal(d.shape[1], r, gen).to(d.device)
    along_random = torch.linalg.matrix_norm(Ur.T @ w @ Vr)
    return Amplification(
        rank=r,
        delta_norm=float(torch.linalg.matrix_norm(d)),
        weight_norm=float(sigma_w.square().sum().sqrt()),
        along_delta=float(along_delta),
        along_weight=float(along_weight),
        along_random=float(along_random),
        shape=(int(d.shape[0]), int(d.shape[1])),
    )


def adapter_amplification(adapter, base, r: int | None = None, module: str | None = None,
                          seed: int = 0) -> dict[str, Amplification]:
    """:func:`amplification` of every linear module of an adapter against its base weights.

    Args:
        adapter: an adapter folder (PEFT format) or ``(config, tensors)`` as
            :func:`lorakit.io.read_adapter` returns them.
        base: the base model: a spec for :func:`lorakit.models.load_model` or an ``nn.Module``.
        r: directions compared; default each module's adapter rank (as the paper's Table 7).
        module: a regular expression selecting module paths (``re.search``).

    Returns:
        module path -> :class:`Amplification`, in the adapter's order. Embedding adapters
        are skipped (their ΔW is not a linear map of the hidden state). LoRA on parameters
        (fused experts, routers) gives a row per expert, ``<module path>.<name>[e]``.

    Raises:
        LorakitError: the adapter does not fit the base, or nothing matches ``module``.
    """
    from lorakit.analysis.weights import adapter_deltas, compile_pattern, linear_weights
    from lorakit.io import read_adapter
    from lorakit.models import load_model

    pattern = compile_pattern(module)
    config, tensors = read_adapter(adapter) if not isinstance(adapter, tuple) else adapter
    model = base if isinstance(base, nn.Module) else load_model(str(base), tokenizer=False)[0]
    weights = linear_weights(model, heads=True)
    results = {}
    for path, delta in adapter_deltas(config, tensors).items():
        if pattern is not None and not pattern.search(path):
            continue
        if path not in weights:
            continue  # an embedding, or a module the base does not have (checked below)
        W = weights[path]
        if tuple(W.shape) != tuple(delta.shape):
            raise LorakitError(f"{path}: the adapter's ΔW is {tuple(delta.shape)} but the base weight is "
                               f"{tuple(W.shape)}; is --base the model the adapter was trained on?")
        results[path] = amplification(delta, W, config.rank_for(path) if r is None else r, seed=seed)
    if config.target_parameters:
        results.update(_on_parameters(model, config, tensors, pattern, r, seed))
    if not results:
        raise LorakitError(f"no linear module of the adapter is found in {type(model).__name__}"
                           + (f" matching {module!r}" if module else "")
                           + "; is --base the model the adapter was trained on?")
    return results


def _on_parameters(model: nn.Module, config, tensors: dict, pattern, r: int | None, seed: int) -> dict:
    """:func:`amplification` of each expert's ``ΔW_e`` against ``W_e`` for an adapter's LoRA on
    parameters, read by loading it onto a copy of ``model`` (the one reader of its layout)."""
    import copy

    from lorakit.layers import LoraParameter
    from lorakit.peft_load import apply_plan, plan_load
    from lorakit.model import add_adapter
    from lorakit.targets import lora_layers

    model = copy.deepcopy(model)
    plan = plan_load(model, config, tensors, "analysed", "the adapter", {})
    add_adapter(model, plan.config, "analysed", init_weights=False)
    apply_plan(model, plan, "analysed")
    results = {}
    for path, layer in lora_layers(model):
        if not isinstance(layer, LoraParameter) or (pattern is not None and not pattern.search(path)):
            continue
        delta, W = layer.delta_weight("analysed"), layer.weight.detach().float()
        if W.dim() == 2:
            delta, W = delta[None], W[None]
        if layer.transposed:  # (E, in, out) -> (E, out, in)
            delta, W = delta.transpose(1, 2), W.transpose(1, 2)
        rank = layer.export_rank("analysed") if r is None else r
        for e in range(len(W)):
            results[f"{path}[{e}]" if len(W) > 1 else path] = amplification(delta[e], W[e], rank, seed=seed)
    return results
