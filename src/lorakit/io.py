"""Adapter files in PEFT's on-disk format: save, load, read and write.

A folder holds ``adapter_config.json`` (PEFT's field names, see
:meth:`lorakit.config.LoraConfig.to_peft_dict`) and ``adapter_model.safetensors`` with
the keys PEFT writes (:mod:`lorakit.peft_format` lists them). Files are written
atomically and never pickled; PEFT's older ``adapter_model.bin`` is read as tensors only.

Loading checks every tensor against the model before touching it: a file that does not
fit raises one :class:`~lorakit.errors.LorakitError` listing every missing or
unexpected key and every shape mismatch, and the model is left as it was.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit import atomic
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inits import REWRITES_WEIGHT
from lorakit.layers.tokens import TokenRows
from lorakit.module_names import name_matches
from lorakit.peft_format import (
    adalora_as_lora, base_model_name, is_adalora, key_paths, layer_tensors, module_key, module_tensors,
    parse_factor_key, token_key, wrapped_key,
)
from lorakit.peft_load import apply_plan, plan_load

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


# ------------------------------------------------------------------ files without a model


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors, without a model.

    Tensors keep the file's keys (``base_model.model.<path>.lora_A.weight``, ...); see
    :func:`lora_factors` to have them as ``{module path: (A, B)}``. A ``.bin`` adapter
    (PEFT's old format) is read with ``torch.load(weights_only=True)``: tensors only,
    never arbitrary pickled objects.

    Raises:
        LorakitError: no such folder, no config, a config that does not parse or that
            lorakit cannot honour, a missing, truncated or corrupt weights file.
    """
    config, tensors, _ = _read(Path(path))
    return config, tensors


def write_adapter(path: str | os.PathLike, config: LoraConfig | dict, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> Path:
    """Write ``config`` and ``tensors`` (PEFT keys, as :func:`read_adapter` returns them) to ``path``.

    Each file is written under a temporary name and renamed into place, so a crash never
    leaves a half-written file. ``metadata`` goes into the safetensors header.

    Returns:
        the folder.

    Raises:
        LorakitError: a value in ``tensors`` is not a tensor, or ``config`` is not a
            LoraConfig or a PEFT config dict.
    """
    folder = Path(path)
    if isinstance(config, dict):
        config = LoraConfig.from_peft_dict(config)
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"config must be a LoraConfig or a PEFT config dict, got {type(config).__name__}")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LorakitError(f"adapter tensors must map names to tensors; bad entries: {bad[:5]}")
    from safetensors.torch import save

    seen: set[int] = set()
    ready = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():  # safetensors refuses tensors that share storage
            tensor = tensor.clone()
            storage = tensor.untyped_storage().data_ptr()
        seen.add(storage)
        ready[key] = tensor
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **(metadata or {})}
    atomic.write_bytes(folder / WEIGHTS_NAME, save(ready, metadata=header))
    text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n"
    atomic.write_bytes(folder / CONFIG_NAME, text.encode())
    return folder


def lora_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A: (r, in), B: (out, r))}`` from an adapter's tensors (PEFT keys); a
    convolution's kernels ``(r, in, *k)``, ``(out, r, 1, …)`` come as the matrices ``(r, in·∏k)``, ``(out, r)``.

    Raises:
        LorakitError: a module has A without B or B without A.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_factor_key(key)
        if parsed is not None:
            path, factor, _ = parsed
            parts.setdefault(path, {})[factor] = tensor
    lonely = [p for p, d in parts.items() if len(d) != 2]
    if lonely:
        raise LorakitError(f"the adapter holds only one of lora_A / lora_B for {lonely[:5]}")
    return {path: (d["A"].flatten(1), d["B"].flatten(1)) for path, d in parts.items()}


# ------------------------------------------------------------------ model <-> files


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 original_base: bool = True) -> Path:
    """Save adapter ``name`` of ``model`` in PEFT's format (loads with ``PeftModel.from_pretrained``).

    ``target_modules`` of ``"all-linear"`` or None is written as the explicit list of
    module names it resolved to on this model, so PEFT wraps exactly the same layers.
    ``task_type`` is the one the adapter was attached with
    (:func:`lorakit.peft_format.with_task_heads`); ``fan_in_fan_out`` says whether the
    targets are Conv1D layers (weight ``(in, out)``), as PEFT expects.
    An adapter whose init rewrote the base weights (pissa, olora) is written, with
    ``original_base``, as the rank-2r adapter that applies to the original weights
    (:mod:`lorakit.init_conversion`); without, as its factors are (for the residual base).

    Returns:
        the folder.

    Raises:
        LorakitError: ``model`` has no adapter ``name``.
    """
    from lorakit.model import export_config, lora_configs
    from lorakit.targets import architecture_name, is_conv1d, linear_leaves, model_fingerprint, walk

    configs = lora_configs(model)
    if name not in configs:
        raise LorakitError(f"model has no adapter {name!r} to save; it has {sorted(configs) or 'none'}")
    config = export_config(model, name)  # AdaLoRA: the ranks kept, in rank_pattern
    tensors = adapter_state_dict(model, name)
    if original_base:
        from lorakit.init_conversion import to_original_base

        config, tensors = to_original_base(model, name, config, tensors)
    changes = {}
    on_parameters = set(key_paths(model, name).values())  # LoRA on parameters: target_parameters says where
    paths = sorted({parsed[0] for parsed in map(parse_factor_key, tensors)
                    if parsed is not None and parsed[0] not in on_parameters})
    if config.target_modules is None or config.target_modules == "all-linear":
        changes["target_modules"] = _explicit_targets(model, paths, config)
    elif paths and (any(not any(name_matches([n], p) for p in paths) for n in config.target_modules)
                    if isinstance(config.target_modules, list) else
                    any(p not in paths and re.fullmatch(config.target_modules, p) for p in walk(model) if p)):
        # a name or pattern that selects a module lorakit does not wrap (a grouped convolution): PEFT would try it
        changes["target_modules"] = _explicit_targets(model, paths, config)
    if isinstance(changes.get("target_modules"), str):  # a regex of the paths says which blocks too
        changes.update(layers_to_transform=None, layers_pattern=None)
    leaves = linear_leaves(model, heads=True)
    conv1d = any(p in leaves and is_conv1d(leaves[p]) for p in paths)
    if config.fan_in_fan_out != conv1d:  # PEFT's flag says how the targets store their weight
        changes["fan_in_fan_out"] = conv1d
    if config.base_model_name_or_path is None:
        changes["base_model_name_or_path"] = base_model_name(model)
    if changes:
        config = config.replace(**changes)
    metadata = {"lorakit_architecture": architecture_name(model), "lorakit_fingerprint": model_fingerprint(model)}
    return write_adapter(path, config, tensors, metadata)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's keys (what :func:`save_adapter` writes)."""
    from lorakit.model import lora_configs, lora_layers, saved_modules

    out: dict[str, torch.Tensor] = {}
    lora_paths = set()
    on_parameters = key_paths(model, name)  # LoRA on parameters: PEFT's nested key paths
    for path, layer in lora_layers(model):
        if layer.in_place_of_module:
            lora_paths.add(path)
        if name in layer.adapters:  # AdaLoRA: the live directions only; DoRA: with the magnitude
            out.update(layer_tensors(on_parameters.get(path, path), layer, name))
    saved_paths = set()
    for path, saved in saved_modules(model):
        saved_paths.add(path)
        if isinstance(saved, TokenRows):  # its weight is the base's; a tied head's rows are the embedding's
            if name in saved.copies and not saved.tied:
                out[token_key(path)] = saved.copies[name].rows
        elif name in saved.copies:
            out.update(module_tensors(path, saved.copies[name].state_dict()))
    bias = lora_configs(model)[name].bias
    if bias != "none":
        for pname, param in model.named_parameters(remove_duplicate=False):
            owner, _, leaf = pname.rpartition(".")
            if leaf != "bias" or ".adapters." in pname or ".copies." in pname or owner in saved_paths:
                continue
            if owner in lora_paths:
                out[wrapped_key(owner, "bias")] = param
            elif bias == "all":
                out[module_key(pname)] = param
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 activate: bool = True) -> nn.Module:
    """Load the adapter in folder ``path`` onto ``model`` as adapter ``name``.

    Files written by PEFT (any LoRA adapter of the features lorakit has) or by
    :func:`save_adapter` load the same way. With ``activate`` the adapter becomes the
    one the forward applies (as :func:`lorakit.model.attach`); otherwise it is only added.

    Returns:
        ``model``, changed in place.

    Raises:
        LorakitError: the file cannot be read (see :func:`read_adapter`), ``name`` is
            taken, or the file does not fit the model: the message lists every missing or
            unexpected key and every shape mismatch. The model is unchanged then.
    """
    from lorakit.model import add_adapter, base_parameters, delete_adapter, lora_configs, set_active

    folder = Path(path)
    config, tensors, metadata = _read(folder)
    taken = lora_configs(model)
    if name in taken:
        raise LorakitError(f"model already has an adapter {name!r}; delete_adapter it first or load under another name")
    plan = plan_load(model, config, tensors, name, folder, metadata)
    # add_adapter freezes the base (and bias modes unfreeze biases): undo that if copying fails.
    grad_flags = [(p, p.requires_grad) for p in base_parameters(model)]
    # init_weights=False: zero factors, no random draw (the caller's random stream stays as it
    # was) and no PiSSA rewrite of W; the config is recorded as the file gives it.
    add_adapter(model, plan.config, name, init_weights=False)
    rewritten = []
    try:
        if config.init in REWRITES_WEIGHT:
            rewritten = _rewrite_base_as_init(model, name, config.init)
        apply_plan(model, plan, name)
    except Exception:
        with torch.no_grad():
            for weight, original in rewritten:
                weight.copy_(original)
        delete_adapter(model, name)
        for param, flag in grad_flags:
            param.requires_grad_(flag)
        raise
    if activate:
        set_active(model, name)
    return model


def _rewrite_base_as_init(model: nn.Module, name: str, init: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``init`` (pissa, olora: it rewrites each target's weight to the residual of its
    starting factors) on adapter ``name``'s layers, as PEFT does when it loads such a file
    onto the original base, so the file's trained factors apply to the residual they were
    trained on. Returns ``(weight, its original values)`` pairs to undo it."""
    from lorakit.targets import lora_layers

    rewritten = []
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.adapters and layer.in_place_of_module:
                rewritten.append((layer.weight, layer.weight.detach().clone()))
                layer.init_adapter(layer.adapters[name], init)
    return rewritten


def _explicit_targets(model: nn.Module, paths: list[str], config: LoraConfig):
    """``target_modules`` naming exactly ``paths`` on ``model``: leaf names when they select
    nothing else (within ``config.layers_to_transform``), else a regex of the full paths
    (PEFT matches a string with fullmatch)."""
    from lorakit.model import targetable_modules

    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    candidates = [p for p, _, _ in targetable_modules(model) if config.in_layers(p)]
    if sorted(p for p in candidates if name_matches(leaves, p)) == sorted(paths):
        return leaves
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


# ------------------------------------------------------------------ reading files


def read_adapter_with_metadata(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """:func:`read_adapter` with the file's metadata (the architecture lorakit recorded), as
    :func:`lorakit.peft_load.plan_load` takes them to check a file against a model."""
    return _read(Path(path))


def read_adapters_of_one_model(folders) -> dict[Path, tuple[LoraConfig, dict[str, torch.Tensor]]]:
    """Several adapter folders that must adapt one model (to combine them): ``{folder: (config,
    tensors)}``. Refused when lorakit's record of the model's structure differs between them, or
    when they adapt no module in common (two architectures' paths); a warning when only the
    recorded base names differ (one model can be named by a path and by a hub name).

    Raises:
        LorakitError: a folder that cannot be read, or adapters made for different models.
    """
    files = {Path(folder): _read(Path(folder)) for folder in folders}
    prints = {meta.get("lorakit_fingerprint"): folder for folder, (_, _, meta) in files.items()
              if meta.get("lorakit_fingerprint")}
    paths = {folder: {parsed[0] for parsed in map(parse_factor_key, tensors) if parsed}
             for folder, (_, tensors, _) in files.items()}
    first = next(iter(paths), None)
    apart = [folder for folder in paths if not paths[folder] & paths[first]]
    if len(prints) > 1 or apart:
        one, other = list(prints.values())[:2] if len(prints) > 1 else (first, apart[0])
        raise LorakitError(f"adapters {one} and {other} were made for different models; adapters combine only when "
                           "they adapt the same base model")
    names = {str(config.base_model_name_or_path) for config, _, _ in files.values() if config.base_model_name_or_path}
    if len(names) > 1:
        warnings.warn(f"the adapters record different base models ({', '.join(sorted(names))}); combined as one "
                      "model's, since their modules match", stacklevel=3)
    return {folder: (config, tensors) for folder, (config, tensors, _) in files.items()}


def adapter_config_dict(folder: Path) -> dict:
    """The ``adapter_config.json`` of adapter folder ``folder`` as written (PEFT's keys), unchecked.

    Raises:
        LorakitError: the folder holds none, or it does not parse as JSON.
    """
    config_file = Path(folder) / CONFIG_NAME
    if not config_file.is_file():
        raise LorakitError(f"{folder} holds no {CONFIG_NAME}; an adapter folder has {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorakitError(f"{config_file} does not parse as JSON ({err}); save the adapter again") from None


def _read(folder: Path) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    if folder.is_file() and folder.name in (WEIGHTS_NAME, CONFIG_NAME, PICKLE_NAME):
        folder = folder.parent
    if not folder.is_dir():
        raise LorakitError(f"adapter folder {folder} does not exist")
    raw = adapter_config_dict(folder)
    config = None if is_adalora(raw) else LoraConfig.from_peft_dict(raw)  # AdaLoRA's is read with its tensors
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        tensors, metadata = _read_safetensors(weights)
    elif (folder / PICKLE_NAME).is_file():
        tensors, metadata = _read_pickle(folder / PICKLE_NAME), {}
    else:
        raise LorakitError(f"{folder} holds no {WEIGHTS_NAME}; an adapter folder has {CONFIG_NAME} and {WEIGHTS_NAME}")
    bad = [k for k, v in tensors.items() if not v.is_floating_point()]
    if bad:
        raise LorakitError(f"{folder}: adapter tensors must be floating point; {bad[:5]} are not")
    if config is None:
        raw, tensors = adalora_as_lora(raw, tensors, folder)
        config = LoraConfig.from_peft_dict(raw)
    return config, tensors, metadata


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types (and OSError) for bad files
        raise LorakitError(f"{file} is truncated or corrupt ({type(err).__name__}: {err}); "
                           "save or copy the adapter again") from None
    return tensors, metadata


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    """PEFT's old ``adapter_model.bin``: tensors only (``weights_only=True``), never code."""
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LorakitError(f"refusing {file}: it holds pickled objects other than tensors, and unpickling them "
                           f"could run arbitrary code ({err}); re-save it with PEFT's safe_serialization=True") from None
    except Exception as err:
        raise LorakitError(f"{file} is truncated or corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LorakitError(f"{file} does not hold a dict of tensors; it is not an adapter")
    return state
