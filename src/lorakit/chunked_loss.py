"""The language-modelling loss without the whole ``(tokens × vocabulary)`` logits at once.

A causal LM's loss is usually computed from ``logits = head(hidden) : (batch, tokens, vocab)``;
for SmolLM2's 49,152-word vocabulary at 8×256 tokens that is 400 MB in fp32, kept for the
backward with its fp32 copy and gradient beside it. Here the model body runs with its
output head set aside, so it returns the hidden states ``(batch, tokens, hidden)``; only
the tokens that are trained (label ≠ -100) are kept, and the head is applied to at most
:data:`CHUNK_BYTES` of fp32 logits at a time:

- a plain ``nn.Linear`` head (the usual case, trained or frozen) goes through
  :class:`_LinearCrossEntropy`, which computes each chunk's gradients in the forward, while
  the chunk's logits exist, and keeps only them (``(tokens, hidden)``, plus ``(vocab, hidden)``
  when the head trains): no logits are recomputed, so it costs no more time than the plain
  loss (the idea of Liger's fused linear cross-entropy);
- any other head (a LoRA layer, a quantized one) is applied chunk by chunk under
  ``torch.utils.checkpoint``, which recomputes the chunk's logits in the backward
  (torchtune's chunked cross-entropy does the same).

Either way the loss and the gradients equal the unchunked ones up to float rounding.
Models that transform the logits after the head (Gemma's soft-capping, Cohere's scale, …)
are computed the plain way, as are models without an output head that lorakit can find.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data.encode import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20  # fp32 logits a chunk may hold: 341 tokens of a 49,152-word vocabulary
#: config fields of models that change the logits after the head (then no chunking)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scaling",
                    "lm_head_multiplier", "logit_multiplier")


def causal_lm_loss(model: nn.Module, batch: dict, label_smoothing: float = 0.0,
                   chunk_bytes: int | None = CHUNK_BYTES, skip_ignored: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, count)`` of a causal LM on ``batch``: cross-entropy summed over the trained
    tokens (logits at position t predict ``labels[:, t + 1]``; label -100 is not trained) and
    their number.

    Args:
        model: a transformers causal LM (or one wrapped in ``DistributedDataParallel``).
        batch: ``input_ids``, ``attention_mask``, ``labels``: ``(batch, tokens)`` each.
        chunk_bytes: fp32 logits one chunk may hold; None computes the whole logits at once.
        skip_ignored: see :func:`chunked_cross_entropy`.

    Returns:
        ``loss_sum`` (fp32 scalar, nats) and ``count`` (long scalar).
    """
    targets = batch["labels"][:, 1:]
    count = (targets != IGNORE_INDEX).sum()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(getattr(_unwrapped(model), "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False  # a loss needs no key/value cache kept for generation
    found = None if chunk_bytes is None else output_head(model)
    if found is None:
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=label_smoothing)
        return loss, count
    path, head = found
    with head_set_aside(_unwrapped(model), path):
        hidden = model(**inputs).logits  # (batch, tokens, hidden): the head was an identity
    loss = chunked_cross_entropy(hidden[:, :-1], head, targets, label_smoothing, chunk_bytes, skip_ignored)
    return loss, count


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                          label_smoothing: float = 0.0, chunk_bytes: int = CHUNK_BYTES,
                          skip_ignored: bool = True) -> torch.Tensor:
    """``Σ cross_entropy(head(hidden), targets)`` over the positions whose target is not -100,
    with the logits made ``chunk_bytes`` (fp32) at a time.

    Args:
        skip_ignored: drop the positions whose target is -100 before applying the head (less
            work); False applies it everywhere and masks them, so that no shape depends on
            the targets' values (a shape-only run, such as :mod:`lorakit.memory`'s, needs that).

    Shapes: ``hidden: (..., hidden_size)``, ``targets: (...)`` -> a fp32 scalar (nats).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if skip_ignored:
        kept = (t != IGNORE_INDEX).nonzero().squeeze(1)
        h, t = h.index_select(0, kept), t.index_select(0, kept)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = max(1, chunk_bytes // (4 * vocab))
    if type(head) is nn.Linear:
        wants_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (h, head.weight, head.bias))
        return _LinearCrossEntropy.apply(h, head.weight, head.bias, t, chunk, label_smoothing, wants_grad)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    recompute = torch.is_grad_enabled()
    for start in range(0, h.shape[0], chunk):
        args = (head, h[start:start + chunk], t[start:start + chunk], label_smoothing)
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute else _chunk_loss(*args))
    return total


def _chunk_loss(head: nn.Module, h: torch.Tensor, t: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)


class _LinearCrossEntropy(torch.autograd.Function):
    """``Σ_i CE(h_i Wᵀ + b, t_i)`` chunk by chunk, the gradients made in the forward.

    For a chunk with fp32 logits ``z``, ``p = softmax(z)``: ``∂/∂z = p − (1−ε)·onehot(t) − ε/V``
    (ε the label smoothing), ``∂h = (∂/∂z) W``, ``∂W += (∂/∂z)ᵀ h``, ``∂b += Σ ∂/∂z``; the
    backward only scales them by the incoming gradient. Shapes: ``h: (n, hidden)``,
    ``weight: (V, hidden)``, ``bias: (V,)`` or None, ``targets: (n,)``.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int, smoothing: float, wants_grad: bool):
        need_h, need_w, need_b = (wants_grad and x is not None and x.requires_grad for x in (h, weight, bias))
        vocab = weight.shape[0]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            trained = tc != IGNORE_INDEX  # all True unless the caller kept ignored positions
            tc = tc.clamp_min(0)
            z = F.linear(hc, weight, bias)
            compute_dtype = z.dtype  # the head's output dtype (bf16 under autocast), as the plain loss has it
            z = z.float()
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            nll = lse - z.gather(1, tc[:, None]).squeeze(1)
            loss = nll if not smoothing else (1 - smoothing) * nll + smoothing * (lse - z.mean(-1))
            total += (loss * trained).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(g.shape[0], device=g.device), tc] -= 1 - smoothing
            if smoothing:
                g.sub_(smoothing / vocab)
            g.mul_(trained[:, None])
            if need_b:
                grad_b += g.sum(0)
            g = g.to(compute_dtype)
            if need_h:
                grad_h[start:start + chunk] = g @ weight.to(compute_dtype)
            if need_w:
                grad_w.addmm_(g.t().float(), hc.float())
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        scaled = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in (grad_h, grad_w, grad_b)]
        return scaled[0], scaled[1], scaled[2], None, None, None, None


# ---------------------------------------------------------------- the head, set aside


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def output_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(module path, module)`` of the output head a chunked loss may apply itself, or None
    when the model has none that transformers names (``get_output_embeddings``) or changes
    the logits after it (:data:`LOGIT_TRANSFORMS`)."""
    inner = _unwrapped(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    for path, module in inner.named_modules():
        if module is head and path:
            return path, head
    return None


class _HiddenStates(nn.Module):
    """Stands in for the output head: hands the hidden states through."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextmanager
def head_set_aside(model: nn.Module, path: str):
    """Within the block the module at ``path`` is an identity, so ``model(...).logits`` are the
    hidden states the head would have read."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = getattr(parent, name)
    setattr(parent, name, _HiddenStates())
    try:
        yield head
    finally:
        setattr(parent, name, head)
