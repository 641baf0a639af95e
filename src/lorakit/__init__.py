"""lorakit: Low-Rank Adaptation (LoRA) for PyTorch models.

Public names are imported lazily so that `lorakit --help` and the pure linear
algebra in :mod:`lorakit.lowrank` start without loading transformers.
"""

from importlib import import_module

from lorakit.errors import LorakitError

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = ["LorakitError", "__version__", *_EXPORTS]
