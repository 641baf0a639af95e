"""What an adapter folder holds, read without its base model (``lorakit inspect ADAPTER``).

The folder's config and tensors come from :func:`lorakit.io.read_adapter_with_metadata`
(PEFT's files, lorakit's or PEFT's own), its factors from :func:`lorakit.io.lora_factors`,
each module's scale from the config (:meth:`lorakit.config.LoraConfig.scaling_for`), and the
task it was trained for from ``lorakit_task.json`` where ``lorakit train`` wrote one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["AdapterSummary", "ModuleSummary", "adapter_summary"]


@dataclass
class ModuleSummary:
    """One adapted module (or parameter: ``<module>.<parameter>``): its path, rank, the ``(out, in)`` of
    its ΔW (of each expert's, for a stack of ``experts``), the scale ``s`` and ``‖s·B·A‖_F`` (over every
    expert)."""

    path: str
    rank: int
    shape: tuple[int, int]
    scaling: float
    delta_norm: float
    experts: int = 1


@dataclass
class AdapterSummary:
    """An adapter folder: ``config`` (:class:`lorakit.config.LoraConfig`), the file's ``metadata``,
    its ``modules``, the parameters of the LoRA factors and of everything else it holds (modules
    saved whole, DoRA magnitudes, biases, token rows), the bytes of its files, and ``task``
    (``lorakit_task.json``, or None)."""

    folder: Path
    config: object
    metadata: dict
    modules: list[ModuleSummary] = field(default_factory=list)
    lora_params: int = 0
    other_params: int = 0
    bytes: int = 0
    task: dict | None = None


def adapter_summary(folder) -> AdapterSummary:
    """Read ``folder`` (an adapter folder, or a ``lorakit train`` run folder holding one).

    ``‖s·B·A‖_F`` is computed from the ``r × r`` products ``BᵀB`` and ``AAᵀ``, never the full ΔW.

    Raises:
        LorakitError: the folder holds no adapter, or one lorakit cannot read (see
            :func:`lorakit.io.read_adapter_with_metadata`).
    """
    from lorakit.io import lora_factors, read_adapter_with_metadata
    from lorakit.peft_format import parse_factor_key
    from lorakit.run_folder import TASK_FILE, adapter_folder

    path = adapter_folder(Path(folder).expanduser())
    config, tensors, metadata = read_adapter_with_metadata(path)
    summary = AdapterSummary(folder=path, config=config, metadata=dict(metadata),
                             bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()))
    factors = lora_factors(tensors)
    parameters = _parameter_names(config, list(factors))
    for module, (A, B) in factors.items():
        A, B, s = A.double(), B.double(), config.scaling_for(module)
        rank, experts = int(A.shape[0]), 1
        if module in parameters:  # LoRA on a parameter: expert e's A is rows e·r…, its B columns e, E + e, …
            host, name = parameters[module]
            rank = config.rank_for(host)
            experts = A.shape[0] // rank if rank and A.shape[0] % rank == 0 else 1
            rank = A.shape[0] // experts
            A, B = A.view(experts, rank, -1), B.view(B.shape[0], rank, experts).permute(2, 0, 1)
            module = f"{host}.{name}"
        else:
            A, B = A[None], B[None]
        grams = [(b.T @ b) @ (a @ a.T) for a, b in zip(A, B)] if B.shape[-1] == A.shape[1] else None
        norm = abs(s) * math.sqrt(max(sum(float(torch.trace(g)) for g in grams), 0.0)) if grams else float("nan")
        summary.modules.append(ModuleSummary(module, rank, (int(B.shape[1]), int(A.shape[2])), s, norm, experts))
    for key, tensor in tensors.items():
        parsed = parse_factor_key(key)
        if parsed is not None and parsed[1] in ("A", "B"):
            summary.lora_params += tensor.numel()
        else:
            summary.other_params += tensor.numel()
    if (path / TASK_FILE).is_file():
        from lorakit.inference import read_task_file

        summary.task = read_task_file(path)
    return summary


def _parameter_names(config, paths: list[str]) -> dict[str, tuple[str, str]]:
    """``{factor path: (module path, parameter)}`` for the factors of LoRA on parameters
    (``target_parameters``). PEFT nests one ``.base_layer`` per parameter after it in the module's
    own order (:func:`lorakit.peft_format.parameter_host`); that order is the model's, not the file's,
    so a module with one adapted parameter has it named, and one with several has them numbered in it."""
    from lorakit.peft_format import parameter_host

    targets = [t.rsplit(".", 1) for t in config.target_parameters or [] if "." in t]
    hosts = {path: parameter_host(path) for path in paths}
    found = {}
    for path, host in hosts.items():
        names = [name for module, name in targets if host == module or host.endswith("." + module)]
        if not names and host == path:
            continue  # an ordinary module
        count = sum(h == host for h in hosts.values())
        index = count - 1 - (len(path) - len(host)) // len(".base_layer")  # the first parameter is the deepest
        found[path] = (host, names[0] if count == 1 and len(names) == 1 else f"parameter{index + 1}of{count}")
    return found
