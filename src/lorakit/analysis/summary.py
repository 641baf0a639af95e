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
    """One adapted module: its path, rank, the ``(out, in)`` of its ΔW, the scale ``s`` and ``‖s·B·A‖_F``."""

    path: str
    rank: int
    shape: tuple[int, int]
    scaling: float
    delta_norm: float


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
    for module, (A, B) in lora_factors(tensors).items():
        A, B, s = A.double(), B.double(), config.scaling_for(module)
        gram = (B.T @ B) @ (A @ A.T) if B.shape[1] == A.shape[0] else None
        norm = abs(s) * math.sqrt(max(float(torch.trace(gram)), 0.0)) if gram is not None else float("nan")
        summary.modules.append(ModuleSummary(module, int(A.shape[0]), (int(B.shape[0]), int(A.shape[1])), s, norm))
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
