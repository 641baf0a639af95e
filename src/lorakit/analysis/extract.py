"""A LoRA adapter extracted from a full fine-tune: the truncated SVD of ΔW = W_ft − W.

Seed 003 ("Relation to SVD"): if ``W_ft − W = U Σ Vᵀ`` then LoRA is learning
``ΔW ≈ U_r Σ_r V_rᵀ``. Here that approximation is computed after the fact, module by
module, and written as a PEFT-format adapter: ``B = U_r Σ_r^½ : (out, r)``,
``A = Σ_r^½ V_rᵀ : (r, in)``, with ``alpha = r`` so the scaling ``s = alpha / r`` is 1
and ``s·B·A`` is the rank-r truncation. By Eckart–Young no rank-r adapter is closer to
ΔW in Frobenius norm; the relative error is ``sqrt(Σ_{i>r} σ_i²) / ‖ΔW‖_F``.

With ``lora_bias`` each extracted module's bias change ``Δb = b_tuned − b_base`` travels
too, as B's bias (PEFT's ``lora_bias``, made for this use), so the adapter adds ``B·A·x + Δb``.

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
from lorakit.layers.parameter import LoraParameter
from lorakit.lowrank import as_matrix, choose_rank, factors_from_svd

__all__ = ["Extraction", "ExtractedModule", "extract_adapter", "extract_lora", "save_extraction"]


@dataclass
class ExtractedModule:
    """One module's extracted factors.

    Attributes:
        A: ``(r, in)`` fp32; B: ``(out, r)`` fp32, with ``B @ A`` ≈ ΔW (scaling 1).
        relative_error: ‖ΔW − B·A‖_F / ‖ΔW‖_F.
        delta_norm: ‖ΔW‖_F.
        bias: ``Δb: (out,)`` fp32 when the bias change is carried (``lora_bias``), else None.
        experts: 0 for a module's weight; ``E ≥ 1`` for LoRA on a parameter (PEFT's
            ``target_parameters``) of ``E`` experts, whose rank-r factors A and B hold
            stacked in :class:`lorakit.layers.parameter.LoraParameter`'s layout.
    """

    A: torch.Tensor
    B: torch.Tensor
    relative_error: float
    delta_norm: float
    bias: torch.Tensor | None = None
    experts: int = 0

    @property
    def rank(self) -> int:
        """Rank per expert (of the module's one matrix when not on a parameter)."""
        return int(self.A.shape[0]) // max(self.experts, 1)

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

        ranks = {path: m.rank for path, m in self.modules.items()}  # a parameter's pattern key: <module>.<name>
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {path: k for path, k in ranks.items() if k != r}
        biased = self.lora_bias  # PEFT reads lora_bias with init True / False only: the start is moot here
        parameters = [path for path, m in self.modules.items() if m.experts]
        return LoraConfig(r=r, alpha=r, target_modules=[p for p in self.modules if p not in parameters],
                          target_parameters=parameters or None, rank_pattern=pattern, alpha_pattern=dict(pattern),
                          init="kaiming" if biased else "gaussian", lora_bias=biased, **fields)

    @property
    def lora_bias(self) -> bool:
        """Whether the modules carry their bias change (B's bias, PEFT's ``lora_bias``)."""
        return any(m.bias is not None for m in self.modules.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's keys: ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``
        (and ``lora_B.bias`` with ``lora_bias``: zeros for a module without a bias)."""
        from lorakit.peft_format import bias_key, factor_tensors, nested_key_paths

        parameters = [tuple(path.rsplit(".", 1)) for path, m in self.modules.items() if m.experts]
        keys = {f"{host}.{name}": key for (host, name), key in nested_key_paths(parameters).items()}
        tensors = factor_tensors({keys.get(path, path): (m.A, m.B) for path, m in self.modules.items()})
        if self.lora_bias:
            for path, m in self.modules.items():
                tensors[bias_key(path)] = m.bias if m.bias is not None else m.B.new_zeros(m.B.shape[0])
        return tensors

    @property
    def relative_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F over all modules together."""
        total = sum(m.delta_norm ** 2 for m in self.modules.values())
        lost = sum((m.relative_error * m.delta_norm) ** 2 for m in self.modules.values())
        return (lost / total) ** 0.5 if total > 0 else 0.0

    @property
    def parameters(self) -> int:
        """Number of adapter parameters: Σ r·(in + out) (+ out per module with ``lora_bias``)."""
        return sum(m.A.numel() + m.B.numel() + (m.B.shape[0] if self.lora_bias else 0)
                   for m in self.modules.values())


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
                 energy: float | None = None, base_parameters: dict | None = None,
                 tuned_parameters: dict | None = None) -> Extraction:
    """Factor every changed weight's ΔW = W_tuned − W_base by truncated SVD.

    Args:
        base_state, tuned_state: module path (or state-dict key ending in ``.weight``)
            -> weight ``(out, in)`` laid out as ``nn.Linear`` stores it (see
            :func:`lorakit.analysis.weights.linear_weights`, which transposes Conv1D).
            Entries that are not 2-D are skipped; both must hold the same keys and shapes.
        rank: keep R directions per module (clipped to min(out, in)).
        energy: or keep, per module, the smallest r holding this fraction of Σσ².
        base_parameters, tuned_parameters: ``"<module path>.<name>"`` -> ``(E, out, in)`` stacks
            (:func:`lorakit.analysis.weights.parameter_weights`) factored per expert at one rank
            (with ``energy``, the largest any expert needs), for LoRA on parameters.

    Returns:
        :class:`Extraction`; ``extraction.modules[path].B @ .A`` is the best rank-r ΔW.

    Raises:
        LorakitError: neither or both of rank/energy, a value out of range, keys or
            shapes that differ, or no weight changed at all.
    """
    _check_rank_or_energy(rank, energy)
    base = {_module_path(k): v[None] for k, v in base_state.items() if getattr(v, "ndim", 0) == 2}
    tuned = {_module_path(k): v[None] for k, v in tuned_state.items() if getattr(v, "ndim", 0) == 2}
    stacks = set(base_parameters or {})
    base.update(base_parameters or {})
    tuned.update(tuned_parameters or {})
    missing, extra = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    if missing or extra:
        raise LorakitError(f"the base and tuned weights differ in modules: only in base {missing[:5]}, "
                           f"only in tuned {extra[:5]}; compare a model with its own fine-tune")
    modules, unchanged = {}, []
    for path, w_base in base.items():
        if w_base.shape != tuned[path].shape:
            start = 0 if path in stacks else 1  # a matrix's own shape, a stack's whole
            raise LorakitError(f"{path} is {tuple(w_base.shape[start:])} in the base but "
                               f"{tuple(tuned[path].shape[start:])} in the tuned model")
        deltas = [as_matrix(t, f"tuned {path}").double() - as_matrix(b, f"base {path}").double()
                  for b, t in zip(w_base, tuned[path])]
        if not any(bool(d.any()) for d in deltas):
            unchanged.append(path)
            continue
        svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
        r = max(min(rank, S.numel()) if rank is not None else choose_rank(S, float(energy))
                for _, S, _ in svds if bool(S.any()))
        factors = [factors_from_svd(U[:, :r], S[:r], Vh[:r], split="sqrt") for U, S, Vh in svds]
        total = sum(S.square().sum() for _, S, _ in svds)
        error = float((sum(S[r:].square().sum() for _, S, _ in svds) / total).sqrt())
        As, Bs = [C.T.float().contiguous() for _, C in factors], [B.float().contiguous() for B, _ in factors]
        A, B = LoraParameter.stacked(As, Bs) if path in stacks else (As[0], Bs[0])
        modules[path] = ExtractedModule(A=A.contiguous(), B=B.contiguous(), relative_error=error,
                                        delta_norm=float(total.sqrt()), experts=len(deltas) if path in stacks else 0)
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
                    module: str | None = None, lora_bias: bool = False) -> Extraction:
    """Extract a LoRA adapter from a full fine-tune and write it to ``out`` (PEFT format).

    Every ``nn.Linear`` / ``Conv1D`` whose weight changed gets factors (module paths
    filtered by the regular expression ``module``), and so does every changed matrix of
    :func:`lorakit.analysis.weights.parameter_weights` (fused experts, routers: LoRA on
    parameters, one rank-r adapter per expert); the output head(s) that changed (a
    classifier trained from scratch) are copied whole into ``modules_to_save``, and so is a
    sequence classifier's head in any case (PEFT's ``SEQ_CLS`` needs it). With ``lora_bias``
    the bias change of each extracted module travels as B's bias; other biases, LayerNorms
    and embeddings are not carried over: the adapter holds ΔW of the linear weights (and
    their Δb with ``lora_bias``, and the heads). Module paths are those of the models as given: a
    folder loads as the kind of model it holds (:func:`lorakit.models.load_model`), so an
    adapter extracted from a ``BertModel`` loads onto a ``BertModel``.

    Args:
        base: the pretrained model: a spec (``"default"``, a folder) or an ``nn.Module``.
        tuned: the fine-tuned model (e.g. a ``lorakit train --method full`` checkpoint).
        out: the adapter folder to write.
        rank, energy: exactly one; see :func:`extract_lora`.
        lora_bias: carry each extracted module's ``Δb = b_tuned − b_base`` (PEFT's ``lora_bias``).

    Returns:
        the :class:`Extraction` that was written.
    """
    from lorakit.analysis.weights import compile_pattern, linear_weights, model_pair, parameter_weights
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
    extraction = extract_lora(base_w, tuned_w, rank=rank, energy=energy, base_parameters=parameter_weights(
        base_model, module), tuned_parameters=parameter_weights(tuned_model, module))
    modules = walk(tuned_model)
    if lora_bias and (on := [path for path, m in extraction.modules.items() if m.experts]):
        raise LorakitError(f"--lora-bias cannot go with LoRA on parameters (PEFT's lora_bias is for dense layers), "
                           f"and {on[0]} changed; leave out --lora-bias, or the parameters with --module")
    if lora_bias:
        base_modules = walk(base_model)
        for path, m in extraction.modules.items():
            before, after = base_modules[path].bias, modules[path].bias
            m.bias = torch.zeros(m.B.shape[0]) if after is None else (after.detach().double()
                                                                        - before.detach().double()).float()
    base_state = base_model.state_dict()
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
    conv1d = any(is_conv1d(modules[p]) for p, m in extraction.modules.items() if not m.experts)
    save_extraction(extraction, out, saved=saved, modules_to_save=names, fan_in_fan_out=conv1d,
                    base_model_name_or_path=base_model_name(base_model), task_type=task_type)
    _carry_task_file(base, tuned, Path(out))
    return extraction


def _carry_task_file(base, tuned, out: Path) -> None:
    """Beside an adapter extracted from a ``lorakit train --method full`` result, the task file that
    result carries (task, labels, max length, data), now for LoRA on ``base``: so ``lorakit eval``,
    ``predict`` and ``serve`` use the adapter as they use a trained one. Nothing for other sources."""
    import json

    from lorakit import atomic
    from lorakit.errors import LorakitError
    from lorakit.run_folder import TASK_FILE, trained_folder

    if not isinstance(base, (str, Path)) or not isinstance(tuned, (str, Path)):
        return
    try:
        info = json.loads((trained_folder(tuned) / TASK_FILE).read_text())
    except (LorakitError, OSError, ValueError):
        return  # a model folder from elsewhere: no task recorded
    spec = str(base)
    model = str(Path(spec).resolve()) if spec not in ("default", "default-chat") and Path(spec).exists() else spec
    atomic.write_json(out / TASK_FILE, {**info, "method": "lora", "model": model}, sort_keys=False)
