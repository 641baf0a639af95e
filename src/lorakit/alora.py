"""Activated LoRA (PEFT's ``alora_invocation_tokens``): an adapter that changes a causal LM only
from its invocation on.

Each row of a forward pass is searched for the last occurrence of the adapter's invocation tokens
(e.g. the tokens that open an assistant turn); the adapter's layers add their update at that
position and after it, and nowhere in a row without the invocation, so everything before it is
computed by the base model alone (which is what lets a server reuse the base model's cache of
the prefix). In a step that extends a cache (generation), the new tokens follow the invocation
in the rows that had one: there the adapter applies to all of them, elsewhere to none, as PEFT's
``generate`` computes it.

The model's forward is watched by one pre-hook (:func:`activate`), which reads ``input_ids``
and sets each activated adapter's :class:`Activation` mask; a layer multiplies the adapter's
input by it (:meth:`Activation.masked`), so the update is zero outside it. In a per-row batch
(:func:`lorakit.per_row.per_row_adapters`, the server's) a :class:`RowGate` does the same for
the rows that chose an activated adapter, each by its own invocation; a server's decode step,
whose rows joined at different times, says which rows' prompts held their invocation
(``invoked``, from :func:`invokes`). Dense layers only, never merged, as in PEFT.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.errors import LorakitError

_KEY = "_lorakit_activations"  # model attribute: {"hook": handle, "adapters": {name: Activation}}


def invocation_starts(input_ids: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    """Where the last occurrence of ``tokens`` starts in each row of ``input_ids (batch, length)``,
    or -1 in a row without one."""
    batch, length = input_ids.shape
    n = len(tokens)
    if length < n:
        return torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
    windows = input_ids.unfold(1, n, 1)  # (batch, length - n + 1, n)
    hits = (windows == torch.tensor(tokens, device=input_ids.device)).all(-1)
    index = torch.arange(hits.shape[1], device=input_ids.device)
    return torch.where(hits, index, -1).max(dim=1).values


class Activation:
    """Where one activated adapter applies in the model's current forward: ``mask (batch, tokens)``,
    True from the invocation on; ``found`` says which rows had one, for the steps that extend a cache."""

    def __init__(self, tokens):
        self.tokens = tuple(int(t) for t in tokens)
        self.mask: torch.Tensor | None = None
        self.found: torch.Tensor | None = None

    def update(self, input_ids: torch.Tensor | None, extends_cache: bool) -> None:
        if input_ids is None:
            self.mask = self.found = None
            return
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        batch, length = ids.shape
        if extends_cache and self.found is not None and self.found.shape[0] == batch:
            self.mask = self.found[:, None].expand(batch, length)
            return
        starts = invocation_starts(ids, self.tokens)
        self.found = starts >= 0
        self.mask = self.found[:, None] & (torch.arange(length, device=ids.device)[None, :] >= starts[:, None])

    def masked(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter's input ``h (..., in)`` zeroed outside the invocation (all of it when the
        forward had no ``input_ids`` to search)."""
        mask = self.mask
        if mask is None:
            return torch.zeros_like(h)
        if mask.numel() != h[..., 0].numel():
            raise LorakitError(f"an activated adapter (alora_invocation_tokens) found {tuple(mask.shape)} tokens in "
                               f"input_ids, but a layer runs on {h[..., 0].numel()}; it needs the model called with "
                               "input_ids, one token per position")
        return h * mask.reshape(*h.shape[:-1], 1).to(h.dtype)


class RowGate:
    """A per-row batch's mask ``(batch, tokens)`` on the adapters' input: ones in the rows of other
    adapters, the invocation's mask in the rows of an activated one; ``invoked`` (one bool or None a
    row), when given, stands for the rows' prompts in a step that extends their caches."""

    def __init__(self, rows, invoked=None):
        self.rows, self.invoked, self.mask = list(rows), None if invoked is None else list(invoked), None

    def set(self, adapters: dict[str, Activation], ids: torch.Tensor | None) -> None:
        batch = len(self.rows)
        length = 1 if ids is None else ids.reshape(batch, -1).shape[1]
        mask = torch.ones(batch, length, dtype=torch.bool, device=None if ids is None else ids.device)
        for row, name in enumerate(self.rows):
            if name in adapters:
                act = adapters[name].mask
                mask[row] = bool(self.invoked[row]) if self.invoked is not None else (
                    act[row] if act is not None else False)
        self.mask = mask

    def masked(self, x3: torch.Tensor) -> torch.Tensor:
        """``x3 (batch, tokens, in)`` zeroed where a row's activated adapter does not apply."""
        if self.mask is None or tuple(self.mask.shape) != tuple(x3.shape[:2]):
            raise LorakitError(f"per-row activated adapters (alora_invocation_tokens) need the model called with "
                               f"input_ids of the rows' tokens; a layer runs on {tuple(x3.shape[:2])}")
        return x3 * self.mask.unsqueeze(-1).to(x3.dtype)


def gate_rows(model: nn.Module, rows, invoked=None) -> RowGate | None:
    """The :class:`RowGate` of a per-row batch whose ``rows`` choose an activated adapter (else None),
    set by the model's forward hook until :func:`ungate_rows`."""
    if not any(name in activations(model) for name in rows):
        return None
    gate = model.__dict__[_KEY]["gate"] = RowGate(rows, invoked)
    return gate


def ungate_rows(model: nn.Module) -> None:
    model.__dict__.get(_KEY, {}).pop("gate", None)


def invokes(model: nn.Module, name: str | None, prompt_ids) -> bool | None:
    """Whether ``prompt_ids`` hold the invocation of adapter ``name``; None for an adapter that is not
    activated (or the base)."""
    act = activations(model).get(name)
    if act is None:
        return None
    return bool(invocation_starts(torch.tensor([list(prompt_ids)]), act.tokens)[0] >= 0)


def activations(model: nn.Module) -> dict[str, Activation]:
    """The model's activated adapters by name."""
    return model.__dict__.get(_KEY, {}).get("adapters", {})


def activate(model: nn.Module, name: str, tokens, layers) -> None:
    """Make adapter ``name`` of ``layers`` (its :class:`~lorakit.layers.LoraLinear` s) activated by
    ``tokens``, watching the model's forward for them."""
    state = model.__dict__.setdefault(_KEY, {"adapters": {}})
    activation = state["adapters"][name] = Activation(tokens)
    for layer in layers:
        adapter = layer.adapters[name]
        adapter.activation = activation
        adapter.fuse_shared_input = False  # the shared-input and one-function paths do not mask
    if "hook" not in state:
        state["hook"] = model.register_forward_pre_hook(_before_forward, with_kwargs=True)


def deactivate(model: nn.Module, name: str) -> None:
    """Forget adapter ``name``'s activation (it was deleted); the hook goes with the last one."""
    state = model.__dict__.get(_KEY)
    if state is None or state["adapters"].pop(name, None) is None:
        return
    if not state["adapters"]:
        state["hook"].remove()
        del model.__dict__[_KEY]


def _before_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    if ids is None:
        warnings.warn("an activated adapter (alora_invocation_tokens) finds its invocation in input_ids; this "
                      "forward has none, so the adapter is off for it", stacklevel=3)
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # (transformers 5 passes "cache" in generate)
    position = kwargs.get("cache_position")
    extends = (position is not None and position.numel() > 0 and int(position.reshape(-1)[0]) > 0) or (
        cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0)
    adapters = activations(model)
    for activation in adapters.values():
        activation.update(ids, extends)
    gate = model.__dict__[_KEY].get("gate")
    if gate is not None:
        gate.set(adapters, ids)
