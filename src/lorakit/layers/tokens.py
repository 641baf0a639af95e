"""Trainable tokens: chosen rows of a token embedding replaced per adapter (PEFT's
``trainable_token_indices``).

An adapter that adds chat tokens, or teaches a few rarely seen ones, trains those rows of
the embedding and nothing else of it. :class:`TokenRows` takes the embedding's place (a
:class:`~lorakit.layers.SavedModule`, so activation, per-row batches and deletion treat it as
any saved module) and holds, per adapter, a :class:`TokenPatch`: the token ids and their new
rows, whole (not a difference: PEFT's ``trainable_tokens_delta`` holds the rows themselves)::

    h[t] = rows[i]  where ids[t] == indices[i],  W[ids[t]] elsewhere   (× embed_scale)

An output head that shares the embedding's weight (tied embeddings) is wrapped too, by a
:class:`TokenRows` tied to the embedding's: it holds nothing of its own, and the logits of
those tokens are computed with the new rows (``z[..., indices] = x · rowsᵀ + b[indices]``).
A linear head named on its own holds rows of its own, applied the same way.

Merging writes the rows into the weight (:meth:`TokenRows.unwrapped`); until then the
frozen weight is never written, so adapters with other tokens share one base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.layers.embedding import embed_scale
from lorakit.layers.saved import SavedModule


class TokenPatch(nn.Module):
    """One adapter's rows: ``indices: (n,)`` token ids, ``rows: (n, dim)`` their trained rows."""

    def __init__(self, indices: list[int], rows: torch.Tensor):
        super().__init__()
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(rows)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hit, row)`` per id: whether the id is one of the patch's tokens, and which row holds it."""
        order = torch.argsort(self.indices)
        ordered = self.indices[order]
        pos = torch.searchsorted(ordered, ids).clamp(max=ordered.shape[0] - 1)
        return ordered[pos] == ids, order[pos]

    def extra_repr(self) -> str:
        return f"tokens={len(self.indices)}, dim={self.rows.shape[1]}"


def _head_logits(out: torch.Tensor, x: torch.Tensor, patch: TokenPatch, head: nn.Linear) -> torch.Tensor:
    """``out`` (the head's logits) with the columns of the patch's tokens computed from its rows."""
    bias = None if head.bias is None else head.bias[patch.indices].detach()
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or patch.rows.requires_grad)
    if wants_grad and not head.weight.requires_grad:
        return _HeadColumns.apply(out, x, patch.rows, head.weight.detach()[patch.indices], patch.indices, bias)
    z = F.linear(x, patch.rows.to(x.dtype), None if bias is None else bias.to(x.dtype)).to(out.dtype)
    return out.index_copy(-1, patch.indices, z) if wants_grad else out.index_copy_(-1, patch.indices, z)


class _HeadColumns(torch.autograd.Function):
    """The patch's logits written into the head's in place, ``z = x·rowsᵀ + b[index]``.

    The backward hands the logits' gradient ``g`` on to the frozen head whole (no copy of a
    vocabulary-wide tensor), which gives ``x`` the gradient ``g·W``; the patch's columns owe
    ``g_z·rows`` instead of ``g_z·W[index]``, so ``x`` gets ``g_z·(rows − W[index])`` here. Exact
    while the head's weight is frozen (its gradient would hold those rows' share); the bias's
    share is the same either way (``∂z/∂b[index] = 1``), so the frozen-or-not bias is left to the head.
    """

    @staticmethod
    def forward(ctx, out, x, rows, weight_rows, index, bias):
        out.index_copy_(-1, index, F.linear(x, rows.to(x.dtype), None if bias is None else bias.to(x.dtype))
                        .to(out.dtype))
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, rows, weight_rows, index)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rows, weight_rows, index = ctx.saved_tensors
        g_z = grad.index_select(-1, index).float()  # (..., n)
        grad_x = grad_rows = None
        if ctx.needs_input_grad[1]:
            grad_x = (g_z @ (rows.float() - weight_rows.float())).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_rows = (g_z.reshape(-1, g_z.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(rows.dtype)
        return grad, grad_x, grad_rows, None, None, None


class TokenRows(SavedModule):
    """In the place of an ``nn.Embedding`` (or, with ``tied_to``, of the ``nn.Linear`` output head
    sharing its weight): the active adapter's token rows replace the weight's.

    Raises:
        LorakitError: the module is neither an embedding nor a linear head, or (at run time) two
            active adapters train the same token.
    """

    def __init__(self, original: nn.Module, tied_to: "TokenRows | None" = None):
        if not isinstance(original, (nn.Embedding, nn.Linear)):
            raise LorakitError(f"trainable tokens replace rows of an nn.Embedding (or of an output head tied to "
                               f"one), not of a {type(original).__name__}")
        super().__init__(original)
        object.__setattr__(self, "_tied_to", tied_to)

    @property
    def copies(self) -> nn.ModuleDict:  # a tied head reads the embedding's patches, and saves none of its own
        return self._tied_to.copies if self._tied_to is not None else self._modules["copies"]

    @property
    def tied(self) -> bool:
        return self._tied_to is not None

    def add_copy(self, name: str, indices: list[int]) -> TokenPatch:
        """Adapter ``name``'s patch of the tokens ``indices``, started from the weight's own rows."""
        if self.tied:
            raise LorakitError("a tied output head takes its token rows from the embedding it shares a weight with")
        if name in self.copies:
            raise LorakitError(f"token rows for adapter {name!r} exist already")
        weight = self.original().weight  # the ids were checked against it (lorakit.tokens.token_targets)
        patch = TokenPatch(indices, weight.detach()[torch.tensor(indices)].clone()).train(self.training)
        self.copies[name] = patch
        return patch

    def delete_copy(self, name: str) -> None:
        if self.tied:  # the embedding deletes the patch; the head only forgets it
            self.active = tuple(n for n in self.active if n != name)
        else:
            super().delete_copy(name)

    # ------------------------------------------------------------------ forward

    def _patches(self, names) -> list[TokenPatch]:
        patches = [self.copies[n] for n in names]
        if len(patches) > 1:
            seen: set[int] = set()
            for name, patch in zip(names, patches):
                mine = set(patch.indices.tolist())
                if mine & seen:
                    raise LorakitError(f"active adapters {list(names)} train the same tokens ({sorted(mine & seen)[:5]}); "
                                       "activate one of them at a time")
                seen |= mine
        return patches

    def _patched(self, x: torch.Tensor, patches: list[TokenPatch]) -> torch.Tensor:
        original = self.original()
        out = original(x)
        if not patches:
            return out
        if isinstance(original, nn.Linear):  # an output head: those tokens' logits from the rows
            for patch in patches:
                out = _head_logits(out, x, patch, original)
            return out
        scale = embed_scale(original)
        for patch in patches:
            hit, row = patch.lookup(x)
            new = patch.rows[row]
            new = new if scale is None else new * scale
            out = torch.where(hit.unsqueeze(-1), new.to(out.dtype), out)
        return out

    def forward(self, x, *args, **kwargs):
        if self._rows is None:
            names = () if self.disabled else self.active
            return self._patched(x, self._patches(names))
        return super().forward(x, *args, **kwargs)

    def _runner(self, name: str | None):
        return lambda x, *args, **kwargs: self._patched(x, [] if name is None else [self.copies[name]])

    # ------------------------------------------------------------------ unloading

    def unwrapped(self, keep: bool) -> nn.Module:
        """The embedding (or head) itself; with ``keep``, the active adapters' rows written into its weight
        (a tied head's weight is the embedding's, written once by the embedding's wrapper)."""
        original = self.original()
        if keep and not self.tied and not self.disabled:
            weight = original.weight
            with torch.no_grad():
                for patch in self._patches(self.active):
                    weight.index_copy_(0, patch.indices.to(weight.device), patch.rows.detach().to(weight.dtype))
        return original

    def extra_repr(self) -> str:
        return f"tied={self.tied}, adapters={list(self.copies)}, active={list(self.active)}"
