"""A LoRA adapter extracted from a full fine-tune: the truncated SVD of ΔW = W_ft − W.

Seed 003 ("Relation to SVD"): if ``W_ft − W = U Σ Vᵀ`` then LoRA is learning
``ΔW ≈ U_r Σ_r V_rᵀ``. Here that approximation is computed after the fact, module by
module, and written as a PEFT-format adapter: ``B = U_r Σ_r^½ : (out, r)``,
``A = Σ_r^½ V_rᵀ : (r, in)``, with ``alpha = r`` so the scaling ``s = alpha / r`` is 1
and ``s·B·A`` is the rank-r truncation. By Eckart–Young no rank-r adapter is closer to
ΔW in Frobenius norm; the relative error is ``sqrt(Σ_{i>r} σ_i²) / ‖ΔW‖_F``.

The rank is either fixed (``rank=R``, clipped to min(out, in)) or chosen per module as
the smallest keeping a fraction of ΔW's energy (``energy=0.95``, seed 003's 90–99%);
per-module ranks go to the config's ``rank_pattern`` (and ``alpha_pattern``, keeping s = 1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.lowrank import as_matrix, choose_rank, factors_from_svd

__all__ = ["Extraction", "ExtractedModule", "extract_adapter", "extract_lora", "save_extraction"]


@dataclass
class ExtractedModule:
    """One module's extracted factors.

    Attributes:
        A: ``(r, in)`` fp32; B: ``(out, r)`` fp32, with ``B @ A`` ≈ ΔW (scaling 1).
        relative_error: ‖ΔW − B·A‖_F / ‖ΔW‖_F.
        delta_norm: ‖ΔW‖_F.
    """

    A: torch.Tensor
    B: torch.Tensor
    relative_error: float
    delta_norm: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def energy(self) -> float:
        """Fraction of ‖ΔW‖_F² the rank-r factors keep (1 − relative_error²)."""
        return 1.0 - self.relative_error ** 2


@dataclass
class Extraction:
    """Extracted factors by module path, and what was left out.

    Attributes:
        modules: module path -> :class:`ExtractedModule`, in the order of the inputs.
        unchanged: paths whose weight did not change (ΔW = 0), so no factors were made.
    """

    modules: dict[str, ExtractedModule]
    unchanged: list[str] = field(default_factory=list)

    def config(self, **fields):
        """A :class:`~lorakit.config.LoraConfig` describing these factors (scaling 1 everywhere).

        ``r`` is the most common rank; other ranks are listed per path in ``rank_pattern``
        with ``alpha_pattern`` equal to them. ``fields`` (``modules_to_save``,
        ``base_model_name_or_path``, ``task_type``) are passed through.
        """
        from lorakit.config import LoraConfig

        ranks = {path: m.rank for path, m in self.modules.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {path: k for path, k in ranks.items() if k != r}
        return LoraConfig(r=r, alpha=r, target_modules=list(self.modules), rank_pattern=pattern,
                          alpha_pattern=dict(pattern), init="gaussian", **fields)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's keys: ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``."""
        from lorakit.peft_format import factor_tensors

        return factor_tensors({path: (m.A, m.B) for path, m in self.modules.items()})

    @property
    def relative_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F over all modules together."""
        total = sum(m.delta_norm ** 2 for m in self.modules.values())
        lost = sum((m.relative_error * m.delta_norm) ** 2 for m in self.modules.values())
        return (lost / total) ** 0.5 if total > 0 else 0.0

    @property
    def parameters(self) -> int:
        """Number of adapter parameters: Σ r·(in + out)."""
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())


def _check_rank_or_energy(rank, energy) -> None:
    if (rank is None) == (energy is None):
        raise LorakitError("give exactly one of rank (e.g. 8) or energy (e.g. 0.95)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorakitError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise LorakitError(f"energy must be a fraction in (0, 1], got {energy!r}; try 0.95")


def _module_path(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def extract_lora(base_state: dict, tuned_state: dict, rank: int | None = None,
                 energy: float | None = None) -> Extraction:
    """Factor every changed weight's ΔW = W_tuned − W_base by truncated SVD.

    Args:
        base_state, tuned_state: module path (or state-dict key ending in ``.weight``)
            -> weight ``(out, in)`` laid out as ``nn.Linear`` stores it (see
            :func:`lorakit.analysis.weights.linear_weights`, which transposes Conv1D).
            Entries that are not 2-D are skipped; both must hold the same keys and shapes.
        rank: keep R directions per module (clipped to min(out, in)).
        energy: or keep, per module, the smallest r holding this fraction of Σσ².

    Returns:
        :class:`Extraction`; ``extraction.modules[path].B @ .A`` is the best rank-r ΔW.

    Raises:
        LorakitError: neither or both of rank/energy, a value out of range, keys or
            shapes that differ, or no weight changed at all.
    """
    _check_rank_or_energy(rank, energy)
    base = {_module_path(k): v for k, v in base_state.items() if getattr(v, "ndim", 0) == 2}
    tuned = {_module_path(k): v for k, v in tuned_state.items() if getattr(v, "ndim", 0) == 2}
    missing, extra = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    if missing or extra:
        raise LorakitError(f"the base and tuned weights differ in modules: only in base {missing[:5]}, "
                           f"only in tuned {extra[:5]}; compare a model with its own fine-tune")
    modules, unchanged = {}, []
    for path, w_base in base.items():
        b = as_matrix(w_base, f"base {path}").double()
        t = as_matrix(tuned[path], f"tuned {path}").double()
        if b.shape != t.shape:
            raise LorakitError(f"{path} is {tuple(b.shape)} in the base but {tuple(t.shape)} in the tuned model")
        delta = t - b
        if not bool(delta.any()):
            unchanged.append(path)
            continue
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, S.numel()) if rank is not None else choose_rank(S, float(energy))
        B, C = factors_from_svd(U[:, :r], S[:r], Vh[:r], split="sqrt")
        total = S.square().sum()
        error = float((S[r:].square().sum() / total).sqrt())
        modules[path] = ExtractedModule(A=C.T.float().contiguous(), B=B.float().contiguous(),
                                        relative_error=error, delta_norm=float(total.sqrt()))
    if not modules:
        raise LorakitError(f"none of the {len(base)} weights changed between the base and the tuned model; "
                           "is --tuned really a fine-tune of --base?")
    return Extraction(modules=modules, unchanged=unchanged)


def save_extraction(extraction: Extraction, path, *, saved: dict[str, torch.Tensor] | None = None,
                    modules_to_save: list[str] | None = None, **config_fields) -> Path:
    """Write ``extraction`` as a PEFT adapter folder with :func:`lorakit.io.write_adapter`.

    Args:
        saved: full tensors of modules_to_save under their model keys
            (``classifier.weight`` -> written as ``base_model.model.classifier.weight``).
        modules_to_save: the module names those tensors belong to (e.g. ``["classifier"]``).
        config_fields: passed to :meth:`Extraction.config` (``base_model_name_or_path``, ``task_type``).
    """
    from lorakit.io import write_adapter
    from lorakit.peft_format import module_key

    tensors = extraction.tensors()
    for key, value in (saved or {}).items():
        tensors[module_key(key)] = value.detach().float().contiguous()
    config = extraction.config(modules_to_save=modules_to_save or None, **config_fields)
    return write_adapter(path, config, tensors,
                         metadata={"lorakit_extracted": "truncated SVD of W_tuned - W_base"})


def extract_adapter(base, tuned, out, rank: int | None = None, energy: float | None = None,
                    module: str | None = None) -> Extraction:
    """Extract a LoRA adapter from a full fine-tune and write it to ``out`` (PEFT format).

    Every ``nn.Linear`` / ``Conv1D`` whose weight changed gets factors (module paths
    filtered by the regular expression ``module``); the output head(s) that changed (a
    classifier trained from scratch) are copied whole into ``modules_to_save``, and so is a
    sequence classifier's head in any case (PEFT's ``SEQ_CLS`` needs it). Biases,
    LayerNorms and embeddings are not carried over: the adapter holds only ΔW of the
    linear weights (and the heads). Module paths are those of the models as given: a
    folder loads as the kind of model it holds (:func:`lorakit.models.load_model`), so an
    adapter extracted from a ``BertModel`` loads onto a ``BertModel``.

    Args:
        base: the pretrained model: a spec (``"default"``, a folder) or an ``nn.Module``.
        tuned: the fine-tuned model (e.g. a ``lorakit train --method full`` checkpoint).
        out: the adapter folder to write.
        rank, energy: exactly one; see :func:`extract_lora`.

    Returns:
        the :class:`Extraction` that was written.
    """
    from lorakit.analysis.weights import compile_pattern, linear_weights, model_pair
    from lorakit.config import LoraConfig
    from lorakit.peft_format import base_model_name, task_heads, task_type_for
    from lorakit.targets import is_conv1d, output_heads, saved_paths, walk

    _check_rank_or_energy(rank, energy)  # before the (slow) model loading
    from lorakit.atomic import check_new_folder

    check_new_folder(out, "the extracted adapter")  # never over the user's files
    compile_pattern(module)
    base_model, tuned_model = model_pair(base, tuned)
    base_w = linear_weights(base_model, module)
    tuned_w = linear_weights(tuned_model, module)
    if not base_w:
        raise LorakitError(f"no linear weight of {type(base_model).__name__} matches {module!r}")
    extraction = extract_lora(base_w, tuned_w, rank=rank, energy=energy)
    base_state = base_model.state_dict()
    modules = walk(tuned_model)
    task_type = task_type_for(tuned_model)
    names = task_heads(tuned_model, task_type, modules)
    for head in output_heads(tuned_model, modules):
        state = {f"{head}.{k}": v for k, v in modules[head].state_dict().items()}
        if any(k not in base_state or base_state[k].shape != v.shape or not torch.equal(base_state[k], v)
               for k, v in state.items()):
            names.append(head.rsplit(".", 1)[-1])
    names = list(dict.fromkeys(names))
    saved = {}
    for path in saved_paths(tuned_model, LoraConfig(modules_to_save=names or None), modules):
        saved.update({f"{path}.{k}": v for k, v in modules[path].state_dict().items()})
    conv1d = any(is_conv1d(modules[p]) for p in extraction.modules)
    save_extraction(extraction, out, saved=saved, modules_to_save=names, fan_in_fan_out=conv1d,
                    base_model_name_or_path=base_model_name(base_model), task_type=task_type)
    return extraction
