"""Per-row adapters: each row of one batch runs through its own adapter (seeds 002/004).

``with per_row_adapters(model, ["sql", "chat", None]): model(x)`` gives row 0 adapter
``sql``, row 1 ``chat`` and row 2 the base model alone, in one forward pass.

Every LoRA layer stacks its adapters (:meth:`LoraLayer.row_stacks`:
``A_rows: (slots, in, r_max)``, ``B_rows: (slots, r_max, out)``, i.e. ``Aᵀ`` and ``(s·B)ᵀ``,
ranks zero-padded, slot 0 all zeros for the base) and keeps the stacks, rewriting only
the slot of an adapter added, deleted or changed (:mod:`lorakit.layers.stacks`). A
forward then does one gather of the rows' slots and two batched matmuls per layer
(BGMV-style), whatever the number of distinct adapters: no Python loop over adapters. Entering the context again (e.g. once per decode step with another
row list) only builds the small ``(batch,)`` slot-index tensor.

The rows choose the adapters: the active set is ignored inside the context. Dropout is
not applied (this is for inference).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from lorakit.adapter_records import cached_per_adapter_set, lora_configs
from lorakit.alora import activations, gate_rows, ungate_rows
from lorakit.errors import LorakitError
from lorakit.targets import lora_layers, saved_modules


def _layers_of(model: nn.Module):
    """The model's LoRA layers and saved modules, kept until an adapter is added or deleted,
    so re-entering the context skips a module walk."""
    def collect():
        return [layer for _, layer in lora_layers(model)], [s for _, s in saved_modules(model)]

    return cached_per_adapter_set(model, collect)


@contextmanager
def per_row_adapters(model: nn.Module, rows: Sequence[str | None], invoked: Sequence[bool | None] | None = None):
    """Run row ``b`` of the next forward passes with adapter ``rows[b]`` (None: the base).

    Args:
        model: a model with adapters attached.
        rows: one adapter name or None per batch row; its length must equal the batch size.
        invoked: for rows of activated adapters (aLoRA) in steps that extend their caches, whether
            each row's prompt held its invocation (:func:`lorakit.alora.invokes`); None: each
            forward's ``input_ids`` say it (:mod:`lorakit.alora`).

    Raises:
        LorakitError: an unknown adapter name, an empty ``rows``, or merged adapters
            (unmerge first: a merged ΔW would apply to every row).
    """
    rows = list(rows)
    if not rows:
        raise LorakitError("per_row_adapters needs one adapter name (or None) per batch row; got an empty list")
    known = lora_configs(model)
    unknown = sorted({r for r in rows if r is not None and r not in known})
    if unknown:
        raise LorakitError(f"unknown adapter(s) {unknown} in the row list; the model has {sorted(known) or 'none'}")
    layers, saved = _layers_of(model)
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise LorakitError(f"adapters {merged} are merged into the weights; unmerge(model) before per-row adapters")

    slot_cache: dict[tuple, torch.Tensor] = {}  # layers with the same slot layout share one index tensor
    gate = gate_rows(model, rows, invoked)  # rows of activated adapters (aLoRA): their tokens' mask
    gated = [layer for layer in layers if gate is not None and any(n in layer.adapters for n in activations(model))]
    try:
        for layer in gated:
            layer.row_gate = gate
        for layer in layers:
            position, *stacks = layer.row_stacks()  # A_rows, B_rows (and DoRA's S_rows)
            device = stacks[0].device
            key = (tuple(position.items()), device)
            slots = slot_cache.get(key)
            if slots is None:
                slots = torch.tensor([position.get(r, 0) for r in rows], dtype=torch.long, device=device)
                slot_cache[key] = slots
            layer.set_rows((slots, *stacks))
        for module in saved:
            module.set_rows(rows)
        yield model
    finally:
        for layer in gated:
            layer.row_gate = None
        ungate_rows(model)
        for layer in layers:
            layer.set_rows(None)
        for module in saved:
            module.set_rows(None)
