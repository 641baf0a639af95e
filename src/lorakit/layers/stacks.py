"""One layer's adapters stacked for per-row batches, kept up to date slot by slot.

A server loads and evicts adapters all day; rebuilding every layer's whole stack after
each change costs time in proportion to the number of resident adapters. Here each
adapter keeps its slot for as long as it lives: a new adapter takes a freed slot (or the
stack grows, doubling), a deleted one has its slot zeroed, a changed one (an optimizer
step, a copy into A or B) is rewritten alone. The stacks are rebuilt whole only when
the largest rank, the dtype or the device changes.

Layout (what :class:`lorakit.layers.linear.LoraLinear` and ``LoraEmbedding`` read):
``A_rows: (slots, in, r_max)`` holds ``Aᵀ`` (for an embedding: a lookup table per slot),
``B_rows: (slots, r_max, out)`` holds ``(s·B)ᵀ``, scaling folded in, smaller ranks
zero-padded. Slot 0 is all zeros: the base model alone.

Adapters with a bias on B (PEFT's ``lora_bias``) add ``bias_rows: (slots, out)`` holding
``s·b`` per slot (zeros for the others), made when the first such adapter arrives.

A kind whose adapters also scale each output feature of the whole layer (DoRA's
``m / ‖W + s·B·A‖``) gives a ``row_scale``: then ``S_rows: (slots, out)`` holds each
slot's factors (1 in slot 0 and in free slots), and the versions compared include the
layer's ``context()`` (e.g. the base weight's version, which the factors depend on).
"""

from __future__ import annotations

import torch


class RowStacks:
    """The per-row stacks of one layer (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, row_scale=None, context=None):
        """``row_scale(adapter) -> (out,)`` tensor: a per-output-feature factor of the whole layer
        (None: none, no ``S_rows``); ``context() -> tuple``: what else the stacked values depend on."""
        self.in_features, self.out_features = in_features, out_features
        self.row_scale, self.context = row_scale, context
        self.slots: dict[str, int] = {}  # adapter name -> slot (>= 1)
        self._versions: dict[str, tuple] = {}
        self._free: list[int] = []
        self.A_rows: torch.Tensor | None = None
        self.B_rows: torch.Tensor | None = None
        self.S_rows: torch.Tensor | None = None
        self.bias_rows: torch.Tensor | None = None
        self.rebuilds = 0  # whole rebuilds (reallocations), for tests and benchmarks

    def update(self, adapters) -> tuple:
        """Bring the stacks in line with ``adapters`` ({name: adapter}, not empty);
        returns ``(slots, A_rows, B_rows)`` (and ``S_rows`` with a ``row_scale``, or ``bias_rows``
        once an adapter has a bias on B), the same tensors while nothing changed.

        The stacks are ordinary tensors even when this runs under ``torch.inference_mode``
        (a server's forward): inference tensors could not be updated in place later."""
        with torch.inference_mode(False), torch.no_grad():
            return self._update(adapters)

    def _update(self, adapters):
        first = next(iter(adapters.values()))
        r_max = max(ad.r for ad in adapters.values())
        if (self.A_rows is None or self.A_rows.shape[-1] < r_max or self.A_rows.dtype != first.A.dtype
                or self.A_rows.device != first.A.device):
            self._allocate(len(adapters) + 1, r_max, first.A.dtype, first.A.device)
        if self.bias_rows is None and any(getattr(ad, "bias", None) is not None for ad in adapters.values()):
            self.bias_rows = self.A_rows.new_zeros((self.A_rows.shape[0], self.out_features))
        for name in [n for n in self.slots if n not in adapters]:
            slot = self.slots.pop(name)
            del self._versions[name]
            self.A_rows[slot].zero_()
            self.B_rows[slot].zero_()
            if self.S_rows is not None:
                self.S_rows[slot].fill_(1)
            if self.bias_rows is not None:
                self.bias_rows[slot].zero_()
            self._free.append(slot)
        context = () if self.context is None else self.context()
        for name, adapter in adapters.items():
            version = adapter.version() + context
            if self._versions.get(name) == version:
                continue
            slot = self.slots.get(name)
            if slot is None:
                slot = self._free.pop() if self._free else self._grow()
                self.slots[name] = slot
            self._write(slot, adapter)
            self._versions[name] = version
        if self.S_rows is not None:
            return self.slots, self.A_rows, self.B_rows, self.S_rows
        if self.bias_rows is not None:
            return self.slots, self.A_rows, self.B_rows, self.bias_rows
        return self.slots, self.A_rows, self.B_rows

    def _allocate(self, capacity: int, r_max: int, dtype, device) -> None:
        self.A_rows = torch.zeros(capacity, self.in_features, r_max, dtype=dtype, device=device)
        self.B_rows = torch.zeros(capacity, r_max, self.out_features, dtype=dtype, device=device)
        if self.row_scale is not None:
            self.S_rows = torch.ones(capacity, self.out_features, dtype=dtype, device=device)
        self.bias_rows = None
        self.slots, self._versions, self._free = {}, {}, list(range(capacity - 1, 0, -1))
        self.rebuilds += 1

    def _grow(self) -> int:
        """Double the number of slots (the old ones copied over); returns a free slot."""
        old = self.A_rows.shape[0]
        A_rows = self.A_rows.new_zeros((2 * old, *self.A_rows.shape[1:]))
        B_rows = self.B_rows.new_zeros((2 * old, *self.B_rows.shape[1:]))
        A_rows[:old] = self.A_rows
        B_rows[:old] = self.B_rows
        self.A_rows, self.B_rows = A_rows, B_rows
        if self.S_rows is not None:
            S_rows = self.S_rows.new_ones((2 * old, self.out_features))
            S_rows[:old] = self.S_rows
            self.S_rows = S_rows
        if self.bias_rows is not None:
            bias_rows = self.bias_rows.new_zeros((2 * old, self.out_features))
            bias_rows[:old] = self.bias_rows
            self.bias_rows = bias_rows
        self._free.extend(range(2 * old - 1, old, -1))
        return old

    def _write(self, slot: int, adapter) -> None:
        self.A_rows[slot].zero_()
        self.B_rows[slot].zero_()
        self.A_rows[slot, :, : adapter.r] = adapter.A.T
        self.B_rows[slot, : adapter.r] = adapter.B.T * adapter.scaling
        if self.row_scale is not None:
            self.S_rows[slot] = self.row_scale(adapter)
        if self.bias_rows is not None:
            bias = getattr(adapter, "bias", None)
            self.bias_rows[slot] = 0 if bias is None else bias * adapter.scaling
