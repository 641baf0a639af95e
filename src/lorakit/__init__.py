"""lorakit: Low-Rank Adaptation (LoRA) for PyTorch models.

Public names are imported lazily so that `lorakit --help` and the pure linear
algebra in :mod:`lorakit.lowrank` start without loading transformers.
"""

import logging
from importlib import import_module

from lorakit.errors import LorakitError

# transformers imports torchao (lorakit's quantized base) whenever it is installed, and torchao
# logs notes at import (kernels a CPU build lacks, a torch deprecation) that tell a user nothing.
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "TrainConfig": "lorakit.train",
    "TrainingDiverged": "lorakit.train",
    "TrainingInterrupted": "lorakit.train",
    "load_trained": "lorakit.inference",
    "evaluate_trained": "lorakit.inference",
    "predict": "lorakit.inference",
    "generate": "lorakit.inference",
    "read_records": "lorakit.data",
    "rotten_tomatoes": "lorakit.data",
    "chatterbot_pairs": "lorakit.data",
    "plot_training_curves": "lorakit.plots",
    "register_method": "lorakit.methods",
    "register_task": "lorakit.tasks",
    "save_adapter": "lorakit.io",
    "load_adapter": "lorakit.io",
    "read_adapter": "lorakit.io",
    "write_adapter": "lorakit.io",
    "lora_factors": "lorakit.io",
    "load_classifier": "lorakit.models",
    "load_causal_lm": "lorakit.models",
    "model_fingerprint": "lorakit.targets",
    "LoraConfig": "lorakit.config",
    "attach": "lorakit.model",
    "add_adapter": "lorakit.model",
    "set_active": "lorakit.model",
    "active_adapters": "lorakit.model",
    "disable_adapters": "lorakit.model",
    "delete_adapter": "lorakit.model",
    "merge": "lorakit.merging",
    "unmerge": "lorakit.merging",
    "merge_and_unload": "lorakit.merging",
    "unload": "lorakit.merging",
    "lora_configs": "lorakit.model",
    "lora_layers": "lorakit.model",
    "saved_modules": "lorakit.model",
    "targetable_modules": "lorakit.model",
    "trainable_report": "lorakit.model",
    "count_parameters": "lorakit.model",
    "target_paths": "lorakit.model",
    "saved_paths": "lorakit.model",
    "base_parameters": "lorakit.model",
    "combine": "lorakit.combination",
    "per_row_adapters": "lorakit.per_row",
    "register_init": "lorakit.inits",
    "subspace_similarity": "lorakit.analysis",
    "compare_adapters": "lorakit.analysis",
    "amplification": "lorakit.analysis",
    "adapter_amplification": "lorakit.analysis",
    "delta_spectrum": "lorakit.analysis",
    "model_spectra": "lorakit.analysis",
    "extract_lora": "lorakit.analysis",
    "extract_adapter": "lorakit.analysis",
    "run_sweep": "lorakit.sweep",
    "attach_adalora": "lorakit.adalora",
    "adalora_step": "lorakit.adalora",
    "adalora_to_lora": "lorakit.adalora",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = ["LorakitError", "__version__", *_EXPORTS]
