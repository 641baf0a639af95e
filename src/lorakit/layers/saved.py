"""``modules_to_save``: a module (e.g. a classifier head) trained in full, one copy per adapter.

:class:`SavedModule` takes the module's place. It registers the original's own
parameters, buffers and children under their original names (the same objects), so the
model's state-dict keys do not change, and adds ``copies.<adapter>``: a trainable deep
copy per adapter. The forward runs the copy of the first active adapter that has one,
else the original.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from lorakit.errors import LorakitError


class SavedModule(nn.Module):
    """Wrapper around ``original`` with per-adapter trainable ``copies: nn.ModuleDict``.

    Raises:
        LorakitError: the original already has an attribute called ``copies``.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        if "copies" in original._modules or "copies" in original._parameters:
            raise LorakitError("cannot save a module that has its own 'copies' attribute")
        object.__setattr__(self, "_original", original)
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._modules.update(original._modules)
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self._rows = None  # (names per row) while per_row_adapters is on
        self.train(original.training)  # its mode (an eval model's head keeps its dropout off)

    def __getattr__(self, name: str):
        """Parameters, buffers and children as any module; other attributes (an embedding's
        ``num_embeddings``, a layer's ``in_features``) from the module it wraps, so code that
        reads them (transformers', the server's) finds them through the wrapper too."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None or name.startswith("_"):
                raise
            return getattr(original, name)

    def add_copy(self, name: str) -> nn.Module:
        """A trainable deep copy of the original for adapter ``name``."""
        if name in self.copies:
            raise LorakitError(f"module copy for adapter {name!r} exists already")
        clone = copy.deepcopy(self.original())
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def delete_copy(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]
        self.active = tuple(n for n in self.active if n != name)

    def set_active(self, names: Iterable[str]) -> None:
        self.active = tuple(n for n in names if n in self.copies)

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = bool(disabled)

    def original(self) -> nn.Module:
        """The wrapped module, with this wrapper's (possibly moved) parameters put back."""
        orig = self._original
        orig._parameters.update(self._parameters)
        orig._buffers.update(self._buffers)
        orig.train(self.training)
        return orig

    def current(self) -> nn.Module:
        """The module the forward runs now."""
        if not self.disabled and self.active:
            return self.copies[self.active[0]]
        return self.original()

    def _runner(self, name: str | None):
        """What runs the rows of adapter ``name`` (None: the original) in a per-row batch."""
        return self.copies[name] if name is not None else self.original()

    def unwrapped(self, keep: bool) -> nn.Module:
        """The plain module to put back in this wrapper's place: with ``keep``, what the active
        adapter trained (its copy), else the original."""
        return self.current() if keep else self.original()

    def set_rows(self, rows) -> None:
        """Per-row mode: ``rows`` a list of adapter names or None per batch row, or None to leave."""
        self._rows = rows

    def forward(self, x, *args, **kwargs):
        if self._rows is None:
            return self.current()(x, *args, **kwargs)
        # Heads are small: run each distinct module on its rows.
        groups: dict = {}
        for i, name in enumerate(self._rows):
            groups.setdefault(name if name in self.copies else None, []).append(i)
        if len(groups) == 1:
            (name,) = groups
            return self._runner(name)(x, *args, **kwargs)
        if x.shape[0] != len(self._rows):
            raise LorakitError(f"per-row adapters were given for {len(self._rows)} rows but the batch has {x.shape[0]}")
        out = None
        for name, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            part = self._runner(name)(x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            elif part.shape[1:] != out.shape[1:]:
                raise LorakitError(f"the adapters of this per-row batch have heads of different sizes ({out.shape[-1]} "
                                   f"and {part.shape[-1]} outputs: classifiers of other label sets); run them in "
                                   "separate batches")
            out.index_copy_(0, index, part)
        return out
