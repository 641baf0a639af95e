"""Combine several adapters into a new one, mathematically right (``lorakit.combine``).

Named ``combination`` so the module does not shadow the function ``lorakit.combine``.

Given adapters ``i`` with ``ΔW_i = s_i B_i A_i`` and weights ``w_i``, every method works
on the ΔW_i of each layer, never on the factors alone:

- ``"cat"``: exact. ``A = [A_1; A_2; …]`` stacked on the rank axis and
  ``B = [w_1 s_1 B_1, w_2 s_2 B_2, …]``, scaling 1, so ``B A = Σ w_i s_i B_i A_i``;
  the ranks add up.
- ``"svd"``: ``Σ w_i ΔW_i`` truncated to rank r by its SVD (``lorakit.lowrank``): the best
  rank-r approximation (Eckart–Young), ``B = U_r √S_r``, ``A = √S_r V_rᵀ``.
- ``"magnitude_prune"``: each ΔW_i keeps its ``int(density · numel)`` entries of largest
  magnitude, the rest set to 0; then ``Σ w_i ΔW_i`` truncated as ``svd``.
- ``"ties"`` (TIES-merging, Yadav et al. 2023): prune as ``magnitude_prune``; elect a sign per
  entry (``"total"``: the sign of ``Σ_i ΔW_i``, ``"frequency"``: the sign most ΔW_i have; 0
  counts as +); the merged entry is the mean of ``w_i ΔW_i`` over the adapters whose entry
  has the elected sign (pruned entries do not count). Then truncated as ``svd``.
- ``"dare_linear"`` (DARE, Yu et al. 2024): each entry of each ΔW_i is kept with probability
  ``density`` and rescaled by ``1/density`` (so its expectation is ΔW_i), then summed as ``svd``.
- ``"dare_ties"``: DARE's random drop and rescale, then TIES's sign election and mean.

These equal PEFT's ``add_weighted_adapter`` with ``combination_type`` ``"svd"``,
``"magnitude_prune_svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"`` on the
same adapters and rank: the masks are drawn as PEFT draws them (one Bernoulli tensor per
adapter and layer, in module order then in the order of ``weights``, in the layout of the
layer's weight), so the same random state gives the same masks.

PEFT's factor-level forms are not offered: mixing the factors linearly (``A = Σ w_i A_i``,
``B = Σ w_i B_i``, PEFT's ``"linear"``) gives ``B A`` cross terms ``w_i w_j B_i A_j``
(PEFT issue 3004), and TIES or DARE applied to A and B separately (PEFT's ``"ties"``,
``"dare_linear"``, …) prunes and elects signs on factors whose product, not their entries,
is the update: the pruned ``B`` times the pruned ``A`` is not a pruned ``ΔW``, and a sign
election on A's entries says nothing about the sign of ΔW's.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lorakit import atomic
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inits import initial_factors
from lorakit.io import read_adapter, read_adapters_of_one_model, write_adapter
from lorakit.lowrank import truncated_svd
from lorakit.model import add_adapter, lora_configs, lora_layers
from lorakit.peft_format import factor_key, parse_factor_key

MAJORITY_SIGNS = ("total", "frequency")


@dataclass(frozen=True)
class Term:
    """One input adapter at one layer: ``weight · scaling · B @ A``.

    ``A: (r, in)``, ``B: (out, r)``; ``to_layout`` lays an ``(out, in)`` matrix out as the
    layer's weight (transposed for Conv1D and embeddings; its own inverse). Random masks are
    drawn in that layout, as PEFT draws them.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    weight: float
    to_layout: Callable[[torch.Tensor], torch.Tensor]
    from_layout: Callable[[torch.Tensor], torch.Tensor] | None = None  # its inverse (None: to_layout itself)

    def delta(self) -> torch.Tensor:
        """``s·B·A`` in fp32, in the layout of the layer's weight (unweighted)."""
        return self.to_layout((self.B.detach().float() @ self.A.detach().float()) * self.scaling)


@dataclass(frozen=True)
class Options:
    """What a method may use besides the terms: ``rank`` (None: the largest input rank),
    ``density`` in (0, 1], ``majority_sign`` (``"total"`` | ``"frequency"``) and the
    ``generator`` of DARE's masks (None: torch's global one, as PEFT)."""

    rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class CombineMethod:
    """A registered method: ``build(terms, options) -> (A: (r', in), B: (out, r'))`` with
    scaling 1; ``truncates``: it takes ``rank``; ``prunes``: it takes ``density``."""

    build: Callable[[list[Term], Options], "tuple[torch.Tensor, torch.Tensor]"]
    truncates: bool
    prunes: bool


COMBINE_METHODS: dict[str, CombineMethod] = {}


def register_combine(name: str, build, *, truncates: bool, prunes: bool) -> None:
    """Make ``combine(..., method=name)`` call ``build(terms, options)``."""
    COMBINE_METHODS[name] = CombineMethod(build, truncates, prunes)


# ---------------------------------------------------------------------- the methods


def _cat(terms: list[Term], options: Options) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.cat([t.A.detach().float() for t in terms], dim=0)
    B = torch.cat([t.B.detach().float() * (t.weight * t.scaling) for t in terms], dim=1)
    return A, B


# A rule maps the unweighted ΔW_i (each in its layer's layout) and the weights (k,) to the merged ΔW.
DeltaRule = Callable[[list[torch.Tensor], torch.Tensor, Options], torch.Tensor]


def _weighted_sum(deltas: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(deltas)
    return (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(0)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density · numel)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return delta
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k=int(density * delta.numel())).indices] = 1
    return delta * mask.view(delta.shape)


def _drop_and_rescale(delta: torch.Tensor, density: float, generator) -> torch.Tensor:
    """Each entry kept with probability ``density`` and divided by it (DARE); one Bernoulli draw
    of ``delta``'s shape and strides (no draw at all when ``density >= 1``, as PEFT)."""
    return delta if density >= 1 else delta * torch.bernoulli(torch.full_like(delta, density), generator=generator) / density


def _elected_mean(pruned: list[torch.Tensor], weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES's disjoint merge: per entry, the mean of ``w_i P_i`` over the i whose sign is the elected one."""
    stacked = torch.stack(pruned)
    sign = stacked.sign()
    votes = stacked.sum(0) if majority_sign == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _sum(deltas, weights, options):
    return _weighted_sum(deltas, weights)


def _magnitude_prune(deltas, weights, options):
    return _weighted_sum([_keep_largest(d, options.density) for d in deltas], weights)


def _ties(deltas, weights, options):
    return _elected_mean([_keep_largest(d, options.density) for d in deltas], weights, options.majority_sign)


def _dare_linear(deltas, weights, options):
    return _weighted_sum([_drop_and_rescale(d, options.density, options.generator) for d in deltas], weights)


def _dare_ties(deltas, weights, options):
    pruned = [_drop_and_rescale(d, options.density, options.generator) for d in deltas]
    return _elected_mean(pruned, weights, options.majority_sign)


def truncated(rule: DeltaRule):
    """A method from a ΔW rule: merge the terms' ΔW with ``rule``, then keep the best rank-r
    approximation (``B = U_r √S_r``, ``A = √S_r V_rᵀ``; r at most the layer's ``min(out, in)``)."""

    def build(terms: list[Term], options: Options) -> tuple[torch.Tensor, torch.Tensor]:
        deltas = [t.delta() for t in terms]
        weights = torch.tensor([t.weight for t in terms], dtype=torch.float32, device=deltas[0].device)
        delta = (terms[0].from_layout or terms[0].to_layout)(rule(deltas, weights, options))  # back to (out, in)
        r = options.rank if options.rank is not None else max(t.A.shape[0] for t in terms)
        r = min(r, *delta.shape)
        if not bool(delta.abs().max() > 0):  # all-zero ΔW (e.g. untrained adapters): SVD is meaningless
            return torch.zeros(r, delta.shape[1]), torch.zeros(delta.shape[0], r)
        U, S, Vh = truncated_svd(delta, r)
        root = S.sqrt()
        return root[:, None] * Vh, U * root[None, :]

    return build


register_combine("cat", _cat, truncates=False, prunes=False)
register_combine("svd", truncated(_sum), truncates=True, prunes=False)
register_combine("magnitude_prune", truncated(_magnitude_prune), truncates=True, prunes=True)
register_combine("ties", truncated(_ties), truncates=True, prunes=True)
register_combine("dare_linear", truncated(_dare_linear), truncates=True, prunes=True)
register_combine("dare_ties", truncated(_dare_ties), truncates=True, prunes=True)


# ---------------------------------------------------------------------- on a model


def combine(model: nn.Module, weights: dict[str, float], method: str = "cat", name: str = "combined",
            rank: int | None = None, *, density: float | None = None, majority_sign: str = "total",
            generator: torch.Generator | None = None) -> nn.Module:
    """Add adapter ``name`` combining ``Σ w_i ΔW_i`` by ``method`` (see the module docstring).

    Args:
        weights: adapter name -> weight ``w_i`` (any real number).
        method: ``"cat"`` (exact, ranks add up), ``"svd"``, ``"magnitude_prune"``, ``"ties"``,
            ``"dare_linear"`` or ``"dare_ties"`` (each truncated to rank ``rank``).
        rank: not with ``cat``; defaults to the largest rank of any input (at any layer).
        density: fraction of ΔW's entries kept, in (0, 1]; required by the pruning methods
            (``magnitude_prune``, ``ties``, ``dare_*``), refused by the others.
        majority_sign: ``"total"`` or ``"frequency"``, for ``ties`` and ``dare_ties``.
        generator: draws DARE's masks (on the model's device); None: torch's global generator.

    The new adapter targets the layers that hold any of the inputs (a layer lacking an input
    combines the others alone), has scaling 1 (``alpha = r``), and is added, not activated.

    Returns:
        ``model`` itself.

    Raises:
        LorakitError: unknown method or adapter, empty weights, a taken name, an input whose
            init rewrote the base weights (pissa, olora), or a rank, density or majority sign
            the method does not take or that is out of range.
    """
    options = check_options(method, weights, rank, density, majority_sign, generator)
    configs = lora_configs(model)
    unknown = [n for n in weights if n not in configs]
    if unknown:
        raise LorakitError(f"unknown adapter(s) {unknown}; the model has {sorted(configs) or 'none'}")
    if name in configs:
        raise LorakitError(f"model already has an adapter {name!r}; pick another name for the combination")
    rewrote = sorted({n for _, layer in lora_layers(model) for n in weights
                      if n in layer.adapters and initial_factors(layer.adapters[n]) is not None})
    if rewrote:
        raise LorakitError(f"adapter(s) {rewrote} started from an init that rewrote the base weights "
                           f"({configs[rewrote[0]].init}): their ΔW is relative to the residual; save them "
                           "(converted), load them onto the original model, then combine")
    _refuse_variants({n: configs[n] for n in weights})
    by_path = {}
    for path, layer in lora_layers(model):
        terms = [Term(layer.adapters[n].A, layer.adapters[n].B, layer.adapters[n].scaling, float(w),
                      layer.weight_to_layout, layer.as_out_in) for n, w in weights.items() if n in layer.adapters]
        if terms:
            by_path[path] = terms
    factors = _build(method, by_path, options)
    add_adapter(model, combined_config(configs[next(iter(weights))], factors), name)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if path in factors:
                A, B = factors[path]
                layer.adapters[name].A.copy_(A)
                layer.adapters[name].B.copy_(B)
    return model


def _build(method: str, by_path: dict[str, list[Term]], options: Options) -> dict[str, tuple]:
    """Each path's combined ``(A, B)``; the rank, when not given, is the largest of any input at
    any layer (as PEFT's ``svd_rank`` default), so every layer gets the same rank."""
    if options.rank is None and COMBINE_METHODS[method].truncates:
        options = replace(options, rank=max(t.A.shape[0] for terms in by_path.values() for t in terms))
    build = COMBINE_METHODS[method].build
    return {path: build(terms, options) for path, terms in by_path.items()}


def check_options(method: str, weights: dict, rank, density, majority_sign: str, generator) -> Options:
    """Validate what ``combine`` was given for ``method``, before any work.

    Raises:
        LorakitError: naming the bad value and what to give instead.
    """
    if method not in COMBINE_METHODS:
        raise LorakitError(f"combine method {method!r} is unknown; choose one of {sorted(COMBINE_METHODS)}")
    if not weights:
        raise LorakitError("combine needs at least one adapter weight, e.g. {'sql': 0.5, 'chat': 0.5}")
    bad = {str(n): w for n, w in weights.items()
           if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)}
    if bad:
        raise LorakitError(f"adapter weights must be finite numbers, got {bad}")
    spec = COMBINE_METHODS[method]
    if rank is not None and not spec.truncates:
        raise LorakitError(f"rank does not apply to method {method!r}, which keeps the sum of the ranks; "
                           "use method='svd' (or a pruning method) for a chosen rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorakitError(f"rank must be a positive integer, got {rank!r}")
    pruning = sorted(n for n, m in COMBINE_METHODS.items() if m.prunes)
    if density is not None and not spec.prunes:
        raise LorakitError(f"density applies to the pruning methods {pruning}, not to {method!r}")
    if spec.prunes and (density is None or isinstance(density, bool) or not isinstance(density, (int, float))
                        or not 0 < density <= 1):
        raise LorakitError(f"method {method!r} needs a density in (0, 1] (the fraction of ΔW's entries kept), "
                           f"got {density!r}; e.g. density=0.5")
    if majority_sign not in MAJORITY_SIGNS:
        raise LorakitError(f"majority_sign {majority_sign!r} is unknown; choose one of {list(MAJORITY_SIGNS)}")
    return Options(rank=rank, density=None if density is None else float(density), majority_sign=majority_sign,
                   generator=generator)


def combined_config(first: LoraConfig, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> LoraConfig:
    """The config of a combination with ``factors`` (path -> (A, B)), scaling 1 at every layer:
    ``r`` the most common rank, the others in ``rank_pattern`` / ``alpha_pattern`` under exact
    path keys; the rest (task type, base model, dropout) from ``first``."""
    ranks = {path: A.shape[0] for path, (A, _) in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {_exact(p): k for p, k in ranks.items() if k != r}
    return first.replace(
        r=r, alpha=r, use_rslora=False, init="gaussian", target_modules=sorted(factors), exclude_modules=None,
        modules_to_save=None, rank_pattern=odd, alpha_pattern=dict(odd),
    )


def _exact(path: str) -> str:
    """A rank_pattern key that matches this path (PEFT matches keys as ``(.*\\.)?(key)$``)."""
    return path.replace(".", r"\.")


# ---------------------------------------------------------------------- on adapter folders


def combine_adapters(adapters: dict[str | os.PathLike, float], out: str | os.PathLike, method: str = "cat",
                     rank: int | None = None, *, density: float | None = None, majority_sign: str = "total",
                     seed: int | None = 0) -> Path:
    """Combine adapter folders (trained on the same base) into the new adapter folder ``out``,
    without loading the base model: the same methods and maths as :func:`combine`.
    ``adapters``: folder -> weight ``w_i``; ``seed`` seeds DARE's masks (a CPU generator; None:
    torch's global one); ``method, rank, density, majority_sign`` as :func:`combine`.
    Modules are combined in the order of their paths; DARE's masks are drawn in the layout of
    each module's weight as far as the files tell it: ``(in, out)`` for embeddings and for
    adapters whose config says ``fan_in_fan_out``, else ``(out, in)``.

    Returns:
        the folder written (PEFT's format: loads with lorakit and ``PeftModel.from_pretrained``).

    Raises:
        LorakitError: ``out`` not new or empty, an unreadable folder, adapters of different models or
            modules of different shapes, full tensors (``modules_to_save``, biases), a bad option.
    """
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    options = check_options(method, adapters, rank, density, majority_sign, generator)
    atomic.check_new_folder(out, "the combined adapter")  # never over the user's files, nor an input
    files = read_adapters_of_one_model(adapters)
    read = [(Path(folder), float(w), *files[Path(folder)]) for folder, w in adapters.items()]
    by_path: dict[str, list[Term]] = {}
    shapes: dict[str, tuple] = {}
    kernels: dict[str, tuple] = {}  # a convolution's path -> (A's, B's kernel dims), to write them back
    for folder, w, config, tensors in read:
        _refuse_variants({str(folder): config})
        factors: dict[str, dict] = {}
        for key, tensor in tensors.items():
            parsed = parse_factor_key(key)
            if parsed is None:
                head = ", a classifier's own head, as PEFT refuses too" * (config.task_type == "SEQ_CLS")
                raise LorakitError(f"adapter {folder} holds the full tensor {key} (modules_to_save or a trained "
                                   f"bias{head}); combine merges LoRA factors only; combine adapters without them")
            path, factor, embedding = parsed
            factors.setdefault(path, {"embedding": embedding})[factor] = tensor
        for path, f in factors.items():
            if "A" not in f or "B" not in f:
                raise LorakitError(f"adapter {folder} holds only one of lora_A / lora_B for {path}")
            if f["A"].dim() > 2:  # a convolution: kernels (r, in, *k) and (out, r, 1, …), as matrices
                kernels[path] = (tuple(f["A"].shape[1:]), tuple(f["B"].shape[2:]))
                f["A"], f["B"] = f["A"].flatten(1), f["B"].flatten(1)
            shape = (f["A"].shape[1], f["B"].shape[0], f["embedding"])
            if shapes.setdefault(path, shape) != shape:
                raise LorakitError(f"adapter {folder} has {path} as (in, out, embedding) = {shape}, another input "
                                   f"{shapes[path]}: the adapters were not trained on the same base model")
            transposed = f["embedding"] or config.fan_in_fan_out
            by_path.setdefault(path, []).append(
                Term(f["A"], f["B"], config.scaling_for(path), w, _transpose if transposed else _identity))
    factors = _build(method, dict(sorted(by_path.items())), options)
    config = combined_config(read[0][2], factors)
    tensors = {}
    for path, (A, B) in factors.items():
        embedding = shapes[path][2]
        if path in kernels:
            A, B = A.reshape(A.shape[0], *kernels[path][0]), B.reshape(*B.shape, *kernels[path][1])
        tensors[factor_key(path, "A", embedding)] = A.contiguous()
        tensors[factor_key(path, "B", embedding)] = B.contiguous()
    return write_adapter(out, config, tensors, {"lorakit_combined": f"{method} of {len(read)} adapters"})


def _refuse_variants(configs: dict[str, LoraConfig]) -> None:
    if other := sorted(n for n, c in configs.items() if c.use_dora or c.target_parameters or c.lora_bias
                       or c.trainable_token_indices or c.alora_invocation_tokens):
        raise LorakitError(f"{other} use DoRA, target_parameters, lora_bias, trainable tokens or aLoRA: combine sums ΔW only")


def _identity(matrix: torch.Tensor) -> torch.Tensor:
    return matrix


def _transpose(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.T
