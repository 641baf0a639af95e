"""How an adapter's A and B start: small functions registered under a name.

Every init receives the adapter's factors and the frozen base weight, and makes
``ΔW = s·B·A`` whatever it should be at step 0:

- ``gaussian`` (the seeds, LoRA §4.1): A ~ N(0, σ = 1/r), B = 0, so ΔW = 0;
- ``kaiming`` (PEFT's default, as ``nn.Linear`` inits its weight): A ~ kaiming-uniform(a=√5), B = 0;
- ``pissa`` (Meng et al. 2024): A, B from the top-r SVD of W, so s·B·A = W_r, and the
  frozen weight becomes the residual ``W − s·B·A``; the model's output is unchanged;
- ``olora`` (Büyükakyüz 2024, as PEFT's ``"olora"``): ``W = Q R`` (QR decomposition),
  ``B = Q[:, :r]``, ``A = R[:r]``, and the frozen weight becomes ``W − s·B·A``;
- ``random``: A and B both random (ΔW ≠ 0), for tests of merge and export.

For embeddings ``gaussian`` and ``kaiming`` follow loralib/PEFT instead: A = 0 and
B ~ N(0, 1), which keeps ΔW = 0 while the (sparse) lookup of A still trains.

Signature of an init::

    fn(A: (r, in) Tensor, B: (out, r) Tensor, weight: (out, in) fp32 Tensor,
       scaling: float, *, embedding: bool) -> (out, in) fp32 Tensor | None

It writes A and B in place (under ``torch.no_grad``) and returns the new base weight
when it changes it (pissa, olora: registered with ``rewrites_weight=True``), else None.

An adapter whose init rewrote W keeps its initial factors (:func:`keep_initial_factors`):
with them, :mod:`lorakit.init_conversion` saves the trained adapter as one that applies
to the original W.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

InitFn = Callable[..., "torch.Tensor | None"]
INITS: dict[str, InitFn] = {}
#: the inits that replace the frozen weight by a residual (their adapters need conversion to apply to W)
REWRITES_WEIGHT: set[str] = set()


def register_init(name: str, *, rewrites_weight: bool = False):
    """Decorator: register ``fn`` as the init called ``name`` (``LoraConfig(init=name)``);
    ``rewrites_weight``: it returns a new frozen weight (see the module docstring)."""

    def add(fn: InitFn) -> InitFn:
        INITS[name] = fn
        if rewrites_weight:
            REWRITES_WEIGHT.add(name)
        return fn

    return add


def get_init(name: str) -> InitFn:
    """The init registered as ``name``.

    Raises:
        LorakitError: no init has that name.
    """
    try:
        return INITS[name]
    except KeyError:
        from lorakit.errors import LorakitError

        raise LorakitError(f"init {name!r} is unknown; choose one of {sorted(INITS)}") from None


def _embedding_zero_a(A: torch.Tensor, B: torch.Tensor) -> None:
    nn.init.zeros_(A)
    nn.init.normal_(B)


@register_init("gaussian")
def gaussian(A, B, weight, scaling, *, embedding=False):
    """A ~ N(0, σ = 1/r), B = 0 (PEFT's ``init_lora_weights="gaussian"``)."""
    if embedding:
        return _embedding_zero_a(A, B)
    nn.init.normal_(A, std=1.0 / A.shape[0])
    nn.init.zeros_(B)
    return None


@register_init("kaiming")
def kaiming(A, B, weight, scaling, *, embedding=False):
    """A ~ kaiming_uniform(a=√5) (bound 1/√in), B = 0 (PEFT's default ``True``)."""
    if embedding:
        return _embedding_zero_a(A, B)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)
    return None


@register_init("random")
def random(A, B, weight, scaling, *, embedding=False):
    """A and B both kaiming-uniform: ΔW ≠ 0 from the start (PEFT's ``False``; for tests)."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return None


@register_init("pissa", rewrites_weight=True)
def pissa(A, B, weight, scaling, *, embedding=False):
    """Principal singular values and vectors: ``s·B·A = U_r diag(S_r) V_rᵀ`` of W.

    With ``W = U S Vᵀ``: ``A = diag(√(S_r/s)) V_rᵀ : (r, in)``, ``B = U_r diag(√(S_r/s)) : (out, r)``;
    returns the residual ``W − s·B·A : (out, in)`` in fp32 that replaces the frozen weight.
    """
    from lorakit.lowrank import truncated_svd

    r = A.shape[0]
    U, S, Vh = truncated_svd(weight.detach().float(), min(r, *weight.shape))
    root = torch.sqrt(S / scaling)
    a = torch.zeros(A.shape, dtype=torch.float32, device=weight.device)
    b = torch.zeros(B.shape, dtype=torch.float32, device=weight.device)
    k = S.shape[0]
    a[:k] = root[:, None] * Vh
    b[:, :k] = U * root[None, :]
    A.copy_(a)
    B.copy_(b)
    # s·B·A from the factors as stored (rounded to their dtype), so W_res + s·B·A = W exactly in fp32.
    return weight.float() - scaling * (B.float() @ A.float())


@register_init("olora", rewrites_weight=True)
def olora(A, B, weight, scaling, *, embedding=False):
    """Orthonormal factors from the QR decomposition ``W = Q R`` (PEFT's ``"olora"``).

    ``B = Q[:, :r] : (out, r)`` (orthonormal columns), ``A = R[:r] : (r, in)`` (upper
    triangular), not rescaled by s; returns the residual ``W − s·B·A : (out, in)`` in fp32.
    A rank above ``min(out, in)`` leaves the extra rows and columns zero.
    """
    Q, R = torch.linalg.qr(weight.detach().float())  # (out, k), (k, in) with k = min(out, in)
    k = min(A.shape[0], Q.shape[1])
    a = torch.zeros(A.shape, dtype=torch.float32, device=weight.device)
    b = torch.zeros(B.shape, dtype=torch.float32, device=weight.device)
    a[:k] = R[:k]
    b[:, :k] = Q[:, :k]
    A.copy_(a)
    B.copy_(b)
    return weight.float() - scaling * (B.float() @ A.float())


def keep_initial_factors(adapter: nn.Module) -> None:
    """Keep a copy of ``adapter.A`` and ``.B`` as they are now (right after an init that rewrote
    W) as the buffers ``A0``, ``B0``: not saved in any state dict, moved with the adapter."""
    adapter.register_buffer("A0", adapter.A.detach().clone(), persistent=False)
    adapter.register_buffer("B0", adapter.B.detach().clone(), persistent=False)


def initial_factors(adapter: nn.Module) -> "tuple[torch.Tensor, torch.Tensor] | None":
    """``(A0: (r, in), B0: (out, r))`` kept by :func:`keep_initial_factors`, or None."""
    A0, B0 = adapter._buffers.get("A0"), adapter._buffers.get("B0")
    return None if A0 is None or B0 is None else (A0, B0)
