"""Where the analyses get their matrices: a model's linear weights, an adapter's A and B.

Every matrix handed to the analyses is laid out ``(out_features, in_features)``, as
``nn.Linear`` stores it; a transformers ``Conv1D`` (GPT-2) stores ``(in, out)`` and is
transposed (:func:`lorakit.targets.weight_out_in`), so ``ΔW = s·B·A`` and ``W`` always line up.
Which leaves are dense layers and which are heads is :mod:`lorakit.targets`' to say.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError

__all__ = ["adapter_deltas", "adapter_factors", "compile_pattern", "linear_weights", "model_pair", "parameter_weights"]


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
    from lorakit.peft_format import factor_key

    factors = {}
    for path, (A, B) in lora_factors(tensors).items():
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise LorakitError(f"{path}: lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; "
                               "expected A (r, in) and B (out, r)")
        factors[path] = (A.float(), B.float())
    if not factors:
        raise LorakitError(f"no LoRA factors found among {len(tensors)} tensors; expected keys like "
                           f"'{factor_key('<module>', 'A')}'")
    return factors


def adapter_deltas(config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module path -> ``ΔW = s·B·A : (out, in)`` fp32, with ``s`` from ``config.scaling_for(path)``.

    ``config`` is the adapter's :class:`lorakit.config.LoraConfig` (one ``s`` per path,
    honouring rank_pattern / alpha_pattern / rsLoRA; LoRA §4.1).
    """
    return {path: (B @ A) * config.scaling_for(path) for path, (A, B) in adapter_factors(tensors).items()}


def linear_weights(model: nn.Module, module: str | None = None, heads: bool = False) -> dict[str, torch.Tensor]:
    """Module path -> weight ``(out, in)`` of every ``nn.Linear`` / ``Conv1D`` leaf of ``model``
    (:func:`lorakit.targets.linear_leaves`).

    Args:
        model: any torch model (without lorakit adapters attached).
        module: a regular expression; only paths it finds (``re.search``) are kept.
        heads: keep the output head(s) too (by default they are left out, as "all-linear" does).

    Returns:
        views of the weights (no copies), Conv1D ones transposed.
    """
    from lorakit.targets import linear_leaves, weight_out_in

    pattern = compile_pattern(module)
    return {path: weight_out_in(leaf) for path, leaf in linear_leaves(model, heads=heads).items()
            if pattern is None or pattern.search(path)}


def parameter_weights(model: nn.Module, module: str | None = None) -> dict[str, torch.Tensor]:
    """``"<module path>.<name>"`` -> ``(E, out, in)`` of each parameter LoRA on parameters adapts
    (:func:`lorakit.targets.adaptable_parameters`: fused experts, routers; a router's matrix is
    ``E = 1``), stored ``(E, in, out)`` ones transposed (the module says ``is_transposed``).

    Args:
        module: a regular expression; only names it finds (``re.search``) are kept.

    Returns:
        views of the parameters (no copies).
    """
    from lorakit.targets import adaptable_parameters, parameter_features, walk

    pattern = compile_pattern(module)
    modules, found = walk(model), {}
    for path, name in adaptable_parameters(model, modules):
        key, host = f"{path}.{name}", modules[path]
        if pattern is None or pattern.search(key):
            param = getattr(host, name).detach()
            stack = param if param.dim() == 3 else param[None]
            found[key] = stack.transpose(1, 2) if parameter_features(host, name)[3] else stack
    return found


def model_pair(base, tuned) -> tuple[nn.Module, nn.Module]:
    """``(base, tuned)`` models from specs or modules; a spec is loaded with
    :func:`lorakit.models.load_model`, as the kind of model its folder holds.

    The tuned model is loaded first so that a base classifier gets the same number of labels.
    A tuned spec that is an adapter folder (PEFT's or lorakit's, or the run folder of ``lorakit train``
    holding one in ``adapter/``) stands for the base with that adapter merged into it
    (:func:`lorakit.merging.merge_and_unload`): its ΔW is the adapter's, DoRA's included.

    Raises:
        LorakitError: a spec cannot be loaded, the adapter does not fit the base, or the two
            models are of different classes.
    """
    import copy

    from lorakit.models import load_model

    adapter = _adapter_folder(tuned)
    if adapter is not None:
        from lorakit.io import load_adapter
        from lorakit.merging import merge_and_unload

        base_model = base if isinstance(base, nn.Module) else load_model(str(base), tokenizer=False)[0]
        return base_model, merge_and_unload(load_adapter(copy.deepcopy(base_model), adapter))
    tuned_model = tuned if isinstance(tuned, nn.Module) else load_model(str(tuned), tokenizer=False)[0]
    labels = getattr(getattr(tuned_model, "config", None), "num_labels", None)
    base_model = base if isinstance(base, nn.Module) else load_model(str(base), tokenizer=False, num_labels=labels)[0]
    if type(base_model) is not type(tuned_model):
        raise LorakitError(f"the base is a {type(base_model).__name__} but the tuned model a "
                           f"{type(tuned_model).__name__}; compare a model with its own fine-tune")
    return base_model, tuned_model


def _adapter_folder(spec) -> Path | None:
    """The adapter folder a tuned-model spec names (:func:`lorakit.run_folder.adapter_folder`: itself, or
    a run folder's result), or None where it names no adapter."""
    from lorakit.io import CONFIG_NAME
    from lorakit.run_folder import adapter_folder

    if isinstance(spec, nn.Module) or spec in ("default", "default-chat"):
        return None
    folder = adapter_folder(Path(spec).expanduser())
    return folder if (folder / CONFIG_NAME).is_file() else None
