"""The singular-value spectrum of a full fine-tune's update ΔW = W_ft − W.

The "systematic" way to choose r (seed 003, "How to decide the r in LoRA"): take the
SVD of ΔW and keep the smallest r whose singular values hold 90–99% of its energy
Σσ² (= ‖ΔW‖_F²). If fine-tuning updates have a low intrinsic rank (LoRA §4.1,
seed 002 "intrinsic rank hypothesis") the energy is reached at small r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.errors import LorakitError
from lorakit.lowrank import as_matrix, choose_rank

__all__ = ["DEFAULT_ENERGIES", "DeltaSpectrum", "delta_spectrum", "model_spectra"]

#: energy fractions whose ranks are reported by default (seed 003: 90–99%)
DEFAULT_ENERGIES = (0.90, 0.95, 0.99)


@dataclass
class DeltaSpectrum:
    """Spectrum of ``ΔW = W_tuned − W_base`` for one matrix.

    Attributes:
        sigma: ``(p,)`` float64 singular values of ΔW, descending, p = min(out, in).
        ranks: energy fraction -> smallest r keeping it (0 for every fraction when ΔW = 0).
        delta_norm: ‖ΔW‖_F.
        weight_norm: ‖W_base‖_F.
    """

    sigma: torch.Tensor
    ranks: dict[float, int] = field(default_factory=dict)
    delta_norm: float = 0.0
    weight_norm: float = 0.0

    @property
    def full_rank(self) -> int:
        """p = min(out, in), the largest rank ΔW could have."""
        return int(self.sigma.numel())

    @property
    def relative_change(self) -> float:
        """‖ΔW‖_F / ‖W_base‖_F."""
        return self.delta_norm / self.weight_norm if self.weight_norm > 0 else float("inf")

    def energy(self) -> torch.Tensor:
        """``(p,)`` cumulative energy Σ_{i≤k} σ_i² / Σσ² (zeros when ΔW = 0)."""
        power = self.sigma.square().cumsum(0)
        total = float(power[-1])
        return power / total if total > 0 else torch.zeros_like(power)


def delta_spectrum(W_base, W_tuned, energies=DEFAULT_ENERGIES) -> DeltaSpectrum:
    """Singular values of ``W_tuned − W_base`` and the ranks that keep each energy fraction.

    Args:
        W_base: ``(out, in)`` pretrained weight (any layout, as long as both agree:
            singular values do not depend on transposition).
        W_tuned: same shape, after fine-tuning.
        energies: fractions in (0, 1].

    Raises:
        LorakitError: shapes differ, a matrix is not finite, or a fraction is outside (0, 1].
    """
    base = as_matrix(W_base, "W_base").double()
    tuned = as_matrix(W_tuned, "W_tuned").double().to(base.device)
    if base.shape != tuned.shape:
        raise LorakitError(f"W_base is {tuple(base.shape)} but W_tuned is {tuple(tuned.shape)}; "
                           "compare a model with its own fine-tune")
    sigma = torch.linalg.svdvals(tuned - base).cpu()
    zero = float(sigma[0]) == 0.0
    ranks = {}
    for e in energies:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e <= 1:
            raise LorakitError(f"energy fractions must lie in (0, 1], got {e!r}")
        ranks[float(e)] = 0 if zero else choose_rank(sigma, float(e))
    return DeltaSpectrum(sigma=sigma, ranks=ranks, delta_norm=float(sigma.square().sum().sqrt()),
                         weight_norm=float(torch.linalg.matrix_norm(base)))


def model_spectra(base, tuned, module: str | None = None, energies=DEFAULT_ENERGIES) -> dict[str, DeltaSpectrum]:
    """:func:`delta_spectrum` of every linear weight (output heads left out) of a fine-tune, and of
    each expert of a mixture-of-experts model's fused stacks and routers
    (:func:`lorakit.analysis.weights.parameter_weights`; an expert's rows are named ``<path>[e]``).

    Args:
        base: the pretrained model: a spec for :func:`lorakit.models.load_model`
            (``"default"``, a folder) or an ``nn.Module``.
        tuned: the fine-tuned model, same kinds (e.g. a ``lorakit train --method full`` checkpoint).
        module: a regular expression selecting module paths (``re.search``).

    Returns:
        module path -> :class:`DeltaSpectrum`, in module order.

    Raises:
        LorakitError: the models cannot be loaded or differ in architecture, or nothing matches.
    """
    from lorakit.analysis.weights import compile_pattern, linear_weights, model_pair, parameter_weights

    compile_pattern(module)  # a bad pattern fails before the models load
    base_model, tuned_model = model_pair(base, tuned)
    base_w, tuned_w = linear_weights(base_model, module), linear_weights(tuned_model, module)
    for weights, model in ((base_w, base_model), (tuned_w, tuned_model)):
        for path, stack in parameter_weights(model, module).items():
            weights.update({f"{path}[{e}]": w for e, w in enumerate(stack)} if len(stack) > 1 else {path: stack[0]})
    if not base_w:
        raise LorakitError(f"no linear weight of {type(base_model).__name__} matches {module!r}")
    if set(base_w) != set(tuned_w):
        raise LorakitError("the base and tuned models have different linear modules; "
                           "compare a model with its own fine-tune")
    return {path: delta_spectrum(w, tuned_w[path], energies) for path, w in base_w.items()}
