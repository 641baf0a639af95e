"""A frozen linear layer whose weight is stored quantized and dequantized inside the forward.

QLoRA (Dettmers et al. 2023, §3) keeps the frozen base in 4 bits and trains LoRA's A and B
in full precision: each forward (and backward) dequantizes one layer's weight, uses it,
and lets it go, so only the quantized bytes stay resident. The storage formats are
torchao's, not written here:

- ``"nf4"``: torchao's ``NF4Tensor`` (what torchtune's QLoRA uses): blocks of 64 values
  share one absmax scale, each value is the nearest of 16 NormalFloat levels times that
  scale; the scales themselves are quantized to int8 in groups (double quantization,
  QLoRA §3). About 0.52 bytes per weight. Rounding: ``|w − ŵ| ≤ 0.152·a + |a − â|`` for a
  block of absmax ``a`` stored as ``â`` (0.152 is half the widest gap between NF4 levels,
  between −1 and −0.696).
- ``"int8"``: torchao's ``Int8Tensor``, symmetric per output row (one fp32 scale per row):
  1 byte per weight plus 5 per row (its scale, and a zero point torchao keeps at 0). Rounding: ``|w − ŵ| ≤ amax_row / 255`` (half a step of
  ``amax_row / 127.5``).

The forward and backward go through :class:`_DequantizedLinear` rather than torchao's own
``F.linear`` overrides: it saves the *quantized* weight for the backward and dequantizes it
again there, while torchao's int8 linear lets autograd keep a full-precision copy of every
layer's weight until the backward, which would undo the saving.

Models loaded by transformers with ``BitsAndBytesConfig`` carry bitsandbytes' own quantized
layers (``Linear4bit``, ``Linear8bitLt``); :func:`is_quantized_linear` and
:func:`dense_weight` know them too, without importing bitsandbytes.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError

#: the kinds :class:`QuantizedLinear` stores
QUANT_KINDS = ("nf4", "int8")
NF4_BLOCK = 64  # values per absmax scale (QLoRA §3)
NF4_SCALER_BLOCK = 256  # scales per double-quantization group (QLoRA §3)


def quantize_tensor(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``weight : (out, in)`` as a torchao tensor of ``kind`` (same shape and dtype, fewer bytes).

    Raises:
        LorakitError: an unknown kind, or an nf4 weight whose size is not a multiple of 64.
    """
    if kind == "nf4":
        to_nf4 = _torchao_nf4()
        blocks = nf4_blocks(weight.numel())
        if blocks is None:
            raise LorakitError(f"nf4 stores blocks of {NF4_BLOCK} values; a weight of shape {tuple(weight.shape)} "
                               f"has {weight.numel()} values; leave this layer unquantized or use int8")
        return to_nf4(weight.detach().contiguous(), *blocks)
    if kind == "int8":
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        return Int8Tensor.from_hp(weight.detach().contiguous(), PerRow())
    raise LorakitError(f"quantization {kind!r} is unknown; choose one of {list(QUANT_KINDS)}")


def _torchao_nf4():
    """torchao's ``to_nf4``, with ``NF4Tensor.clone`` (hence ``copy.deepcopy`` of a model) made
    exact: torchao 0.18 clones by quantizing the dequantized values again with its default
    block sizes, which rounds a second time and fails where 256 scales do not divide."""
    from torchao.quantization import to_nf4
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    def clone(func, *args, **kwargs):
        tensor = args[0][0]
        names, _ = tensor.__tensor_flatten__()
        copied = {n: getattr(tensor, n).clone() for n in names}
        return nf4_tensor.NF4Tensor(*nf4_tensor.construct_nf4_args(tensor, copied))

    nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.clone.default] = clone
    return to_nf4


def nf4_blocks(numel: int) -> tuple[int, int] | None:
    """``(block, scaler block)`` for an nf4 tensor of ``numel`` values, or None when ``numel``
    is not a multiple of 64. The scaler block is the largest divisor of the number of
    blocks up to 256 (torchao needs it to divide; SmolLM2's 576×576 has 5,184 blocks: 216)."""
    if numel % NF4_BLOCK:
        return None
    n_blocks = numel // NF4_BLOCK
    return NF4_BLOCK, max(d for d in range(1, min(NF4_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def dequantize_tensor(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torchao quantized tensor as a plain one in ``dtype`` (default: the dtype it was quantized from)."""
    dtype = dtype or weight.dtype
    if hasattr(weight, "get_original_weight"):  # NF4Tensor
        return _nf4_values(weight).to(dtype)
    return weight.dequantize(dtype)


def _nf4_values(weight) -> torch.Tensor:
    """The values of an ``NF4Tensor``, bit for bit those of its ``get_original_weight()``, with
    a quarter of its temporaries: one byte of codes and a 4-byte index per value, where torchao
    makes 8-byte indices and four float copies. It runs in every forward and backward of every
    quantized layer, so its temporaries are what a quantized step churns through."""
    packed = weight.quantized_data  # (numel / 2,) uint8: two 4-bit codes a byte, the first in the high half
    codes = torch.stack((packed >> 4, packed & 0b1111), dim=1).view(-1)
    values = weight.nf4.index_select(0, codes.int())
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                       weight.scaler_block_size)  # (n_blocks,) in the weight's dtype
    return values.view(-1, weight.block_size).mul_(scales[:, None]).view(weight.shape)


def stored_bytes(weight: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: the sum of its inner tensors for a torchao
    tensor or a bitsandbytes parameter's packed data and scales."""
    if hasattr(weight, "__tensor_flatten__") and type(weight) not in (torch.Tensor, nn.Parameter):
        names, _ = weight.__tensor_flatten__()
        return sum(stored_bytes(getattr(weight, n)) for n in names if getattr(weight, n) is not None)
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)  # bitsandbytes Params4bit
    if state is not None:
        total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
    scales = getattr(weight, "SCB", None)  # bitsandbytes Int8Params
    if scales is not None:
        total += scales.numel() * scales.element_size()
    return total


def _state_tensors(state) -> list[torch.Tensor]:
    found = [getattr(state, "absmax", None), getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return [t for t in found if isinstance(t, torch.Tensor)]


class _DequantizedLinear(torch.autograd.Function):
    """``x Ŵᵀ + b`` with ``Ŵ`` dequantized from ``weight`` in the forward and again in the
    backward; only the quantized ``weight`` is saved. No gradient for the weight (frozen).

    Shapes: ``x: (..., in)``, ``weight: (out, in)`` quantized, ``bias: (out,)`` -> ``(..., out)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_tensor(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ dequantize_tensor(weight, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose ``weight`` is a torchao quantized tensor of ``kind``.

    It keeps the module path and the parameter names of the ``nn.Linear`` it replaces
    (``weight``, ``bias``), and being an ``nn.Linear`` it is a LoRA target like any other.
    The bias, if any, stays as it was (not quantized, trainable if it was).

    Shapes: ``x: (..., in_features)`` -> ``(..., out_features)``. ``from_conv1d``: the layer
    replaced a transformers ``Conv1D``, which dequantizing gives back.
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, kind: str, from_conv1d: bool = False):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense weight
        self.out_features, self.in_features = weight.shape
        self.kind = kind
        self.from_conv1d = from_conv1d
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Module, kind: str) -> "QuantizedLinear":
        """The layer ``linear`` with its weight quantized to ``kind`` (its bias shared): an
        ``nn.Linear``, or a transformers ``Conv1D`` (GPT-2), whose ``(in, out)`` weight is stored
        transposed, as ``(out, in)``."""
        from lorakit.dense import is_conv1d, weight_out_in

        made = cls(quantize_tensor(weight_out_in(linear), kind), linear.bias, kind, is_conv1d(linear))
        made.train(linear.training)
        return made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self.weight, self.bias)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight ``(out_features, in_features)`` in ``dtype`` (default: the original's)."""
        return dequantize_tensor(self.weight, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"{self.kind}"


def _bnb_types() -> tuple[type, ...]:
    """bitsandbytes' quantized linear types, if bitsandbytes is loaded (no model can hold one otherwise)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer that keeps its weight quantized: a
    :class:`QuantizedLinear`, or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``."""
    return isinstance(module, (QuantizedLinear, *_bnb_types()))


def quantization_kind(module: nn.Module) -> str | None:
    """``"nf4"``, ``"int8"``, ``"bnb-4bit"``, ``"bnb-8bit"``, or None for a dense layer."""
    if isinstance(module, QuantizedLinear):
        return module.kind
    bnb = _bnb_types()
    if bnb and isinstance(module, bnb[0]):
        return "bnb-4bit"
    if bnb and isinstance(module, bnb[1]):
        return "bnb-8bit"
    return None


def dense_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of a quantized linear layer dequantized to ``(out_features, in_features)`` in
    ``dtype``; a dense layer's own weight cast to ``dtype``.

    Raises:
        LorakitError: a bitsandbytes layer in a state lorakit cannot read.
    """
    kind = quantization_kind(module)
    if kind is None:
        return module.weight.detach().to(dtype)
    if kind in QUANT_KINDS:
        return module.dense_weight(dtype)
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if kind == "bnb-4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an inference forward on CPU
            # the inverse rewrites the state it is given: hand it a copy, the layer keeps its own
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return bnbf.dequantize_4bit(data, state).to(dtype).reshape(module.out_features, module.in_features)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(module.state, "SCB", None)
    if scales is None:
        raise LorakitError("this bitsandbytes 8-bit layer holds no scales (SCB); move the model to its device "
                           "once so bitsandbytes quantizes it, then merge")
    return bnbf.int8_vectorwise_dequant(weight.data, scales).to(dtype)
