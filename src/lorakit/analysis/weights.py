"""Where the analyses get their matrices: a model's linear weights, an adapter's A and B.

Every matrix handed to the analyses is laid out ``(out_features, in_features)``, as
``nn.Linear`` stores it; a transformers ``Conv1D`` (GPT-2) stores ``(in, out)`` and is
transposed here, so ``ΔW = s·B·A`` and ``W`` always line up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError

__all__ = ["PEFT_PREFIX", "adapter_deltas", "adapter_factors", "compile_pattern", "load_model",
           "is_conv1d", "linear_weights", "num_labels_of", "output_heads"]

PEFT_PREFIX = "base_model.model."
_HEAD_NAMES = ("classifier", "score", "lm_head", "cls", "qa_outputs")


def compile_pattern(module: str | None):
    """``re.compile(module)`` or None; a bad pattern raises LorakitError naming it."""
    if not module:
        return None
    try:
        return re.compile(module)
    except re.error as err:
        raise LorakitError(f"module pattern {module!r} is not a valid regular expression ({err})") from None


def adapter_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> ``(A: (r, in), B: (out, r))`` fp32 from an adapter's tensors in PEFT's key layout.

    The keys are read by :func:`lorakit.io.lora_factors`; other keys (modules_to_save
    copies, biases) are skipped.

    Raises:
        LorakitError: the tensors hold no LoRA factor, a module has A without B, or a
            module's A and B disagree on the rank.
    """
    from lorakit.io import lora_factors

    factors = {}
    for path, (A, B) in lora_factors(tensors).items():
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise LorakitError(f"{path}: lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; "
                               "expected A (r, in) and B (out, r)")
        factors[path] = (A.float(), B.float())
    if not factors:
        raise LorakitError(f"no LoRA factors found among {len(tensors)} tensors; expected keys like "
                           f"'{PEFT_PREFIX}<module>.lora_A.weight'")
    return factors


def adapter_deltas(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module path -> ``ΔW = s·B·A : (out, in)`` fp32, with ``s`` from ``config.scaling_for(path)``.

    ``config`` is the adapter's :class:`lorakit.config.LoraConfig` (one ``s`` per path,
    honouring rank_pattern / alpha_pattern / rsLoRA; LoRA §4.1).
    """
    return {path: (B @ A) * config.scaling_for(path) for path, (A, B) in adapter_factors(tensors).items()}


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2), whose weight is stored ``(in, out)``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def output_heads(model: nn.Module) -> set[str]:
    """Paths of the model's output head(s): the output embeddings and classifier-like heads."""
    named = {id(m): p for p, m in model.named_modules()}
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None and id(out) in named:
        heads.add(named[id(out)])
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and id(head) in named:
            heads.add(named[id(head)])
    return heads


def linear_weights(model: nn.Module, module: str | None = None, heads: bool = False) -> dict[str, torch.Tensor]:
    """Module path -> weight ``(out, in)`` of every ``nn.Linear`` / ``Conv1D`` leaf of ``model``.

    Args:
        model: any torch model (without lorakit adapters attached).
        module: a regular expression; only paths it finds (``re.search``) are kept.
        heads: keep the output head(s) too (by default they are left out, as "all-linear" does).

    Returns:
        views of the weights (no copies), Conv1D ones transposed.
    """
    pattern = compile_pattern(module)
    skip = set() if heads else output_heads(model)
    weights = {}
    for path, mod in model.named_modules():
        if path in skip or any(path.startswith(h + ".") for h in skip):
            continue
        if pattern is not None and not pattern.search(path):
            continue
        conv1d = is_conv1d(mod)
        if (isinstance(mod, nn.Linear) or conv1d) and not any(True for _ in mod.children()):
            weights[path] = mod.weight.detach().T if conv1d else mod.weight.detach()
    return weights


def _architectures(spec: str) -> list[str]:
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return []
    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError) as err:
        raise LorakitError(f"cannot read {config}: {err}") from None


def num_labels_of(spec: str) -> int | None:
    """Number of labels a classifier folder's config.json declares, else None."""
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    if "id2label" in data:
        return len(data["id2label"])
    return data.get("num_labels")


def load_model(spec: str, num_labels: int | None = None) -> nn.Module:
    """Load a base or fine-tuned model for analysis, in eval mode.

    ``"default"`` and folders whose ``config.json`` names a ``...ForSequenceClassification``
    architecture load as classifiers (:func:`lorakit.models.load_classifier`, with
    ``num_labels`` from the folder or the argument); everything else as a causal LM
    (:func:`lorakit.models.load_causal_lm`). A ``lorakit train --method full`` run folder
    stands for the ``model/`` folder inside it. The classifier head of ``"default"`` starts
    random: compare heads only between fine-tunes.
    """
    from lorakit import models

    run_model = Path(spec).expanduser() / "model"
    if not (Path(spec).expanduser() / "config.json").is_file() and (run_model / "config.json").is_file():
        spec = str(run_model)  # the run folder of `lorakit train --method full`: its model/ inside
    archs = _architectures(spec)
    if spec == "default" or any(a.endswith("ForSequenceClassification") for a in archs):
        labels = num_labels or num_labels_of(spec) or 2
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
            torch.manual_seed(0)  # the random head of "default" is then the same on every load
            model, _ = models.load_classifier(spec, num_labels=labels)
        return model
    model, _ = models.load_causal_lm(spec)
    return model


def model_pair(base, tuned) -> tuple[nn.Module, nn.Module]:
    """``(base, tuned)`` models from specs or modules; a spec is loaded with :func:`load_model`.

    The tuned model is loaded first so that the base classifier gets the same number of labels.
    """
    tuned_model = tuned if isinstance(tuned, nn.Module) else load_model(str(tuned))
    labels = getattr(getattr(tuned_model, "config", None), "num_labels", None)
    base_model = base if isinstance(base, nn.Module) else load_model(str(base), num_labels=labels)
    if type(base_model) is not type(tuned_model):
        raise LorakitError(f"the base is a {type(base_model).__name__} but the tuned model a "
                           f"{type(tuned_model).__name__}; compare a model with its own fine-tune")
    return base_model, tuned_model
