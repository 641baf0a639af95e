"""LoRA on convolutions (``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``), as PEFT adapts them.

A convolution with ``groups = 1`` applies one matrix ``W: (out, in·∏k)`` to every patch of
its input (``k`` the kernel size); its kernel ``(out, in, *k)`` is that matrix reshaped. The
adapter is LoRA on that matrix, ``ΔW = s·B·A`` with ``A: (r, in·∏k)``, ``B: (out, r)``, run
as two convolutions::

    h = conv(x, W) + b + s · B ⊛ (A ⊛ x)

``A ⊛ x`` is a convolution with A's rows as ``r`` kernels ``(in, *k)`` and the layer's own
stride, padding (and padding mode) and dilation; ``B ⊛`` is a 1×1 convolution mapping ``r``
channels to ``out``. The composition is the convolution with kernel ``s·B·A`` (reshaped),
so merging adds ``ΔW`` into the kernel. A PEFT file holds the two kernels:
``lora_A.weight: (r, in, *k)``, ``lora_B.weight: (out, r, 1, …)`` (:mod:`lorakit.peft_format`
reshapes them).

Differences from PEFT: A runs with the layer's dilation and padding mode (PEFT gives A only
kernel, stride and padding, so for a dilated layer its forward and its merged kernel
disagree); a convolution with ``groups > 1`` is refused (PEFT adapts it with a grouped B,
an update that is no grouped kernel and cannot be merged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.dense import conv_features
from lorakit.errors import LorakitError
from lorakit.layers.base import LoraLayer

_CONV_FNS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # kernel ndim -> functional convolution


class LoraConv(LoraLayer):
    """Takes the place of an ``nn.Conv1d``/``Conv2d``/``Conv3d`` with ``groups = 1``.

    Shapes: ``x: (N, in, *spatial)`` -> ``(N, out, *spatial')``; each adapter holds
    ``A: (r, in·∏k)`` and ``B: (out, r)``; ``ΔW`` lies in ``weight`` as ``(out, in, *k)``.

    Raises:
        LorakitError: the convolution has ``groups > 1``; (per-row mode) the batch size
            differs from the number of rows given.
    """

    takes_lora_bias = True  # B, PEFT's 1×1 convolution, may have a bias (lora_bias): s·b on each output channel

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        return module.groups == 1

    def __init__(self, base: nn.Module):
        if base.groups != 1:
            raise LorakitError(f"lorakit adapts convolutions with groups=1; this {type(base).__name__} has "
                               f"groups={base.groups}, whose LoRA update cannot be merged into its kernel: "
                               "leave it out of target_modules")
        super().__init__(base)
        self.register_parameter("bias", base.bias)
        self.in_features, self.out_features = conv_features(base)
        self.kernel_shape = tuple(base.weight.shape[1:])  # (in_channels, *kernel_size)
        self._conv_fn = _CONV_FNS[base.weight.dim()]

    def weight_to_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.out_features, *self.kernel_shape)

    def as_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(self.out_features, self.in_features)

    def channel_view(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector ``(out,)`` shaped to broadcast over ``(N, out, *spatial)``."""
        return vector.view(-1, *([1] * (self.weight.dim() - 2)))

    # ------------------------------------------------------------------ the two convolutions

    def conv(self, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None = None,
             groups: int = 1) -> torch.Tensor:
        """``x`` convolved with ``kernel`` using this layer's stride, padding, padding mode and dilation."""
        b = self._base
        if b.padding_mode != "zeros":
            x = F.pad(x, b._reversed_padding_repeated_twice, mode=b.padding_mode)
            return self._conv_fn(x, kernel, bias, b.stride, 0, b.dilation, groups)
        return self._conv_fn(x, kernel, bias, b.stride, b.padding, b.dilation, groups)

    def down(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``A ⊛ h : (N, r, *spatial')``: A's rows as ``r`` kernels of the layer's shape."""
        return self.conv(h, A.view(A.shape[0], *self.kernel_shape))

    def up(self, z: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``B ⊛ z : (N, out, *spatial')``: the 1×1 convolution from ``r`` channels to ``out``."""
        return self._conv_fn(z, B.reshape(*B.shape, *([1] * (z.dim() - 2))))

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self._rows is not None:
            return self._forward_rows(x, out)
        for ad in self._run:
            h = x if ad.dropout is None else ad.dropout(x)
            if h.dtype != ad.A.dtype:
                h = h.to(ad.A.dtype)
            z = self.down(h, ad.A) * ad.scaling  # scaled on r channels, the smaller side
            out = out + self.up(z, ad.B).to(out.dtype)
            if ad.bias is not None:  # lora_bias: s·b
                out = out + self.channel_view(ad.bias * ad.scaling).to(out.dtype)
        return out

    # ------------------------------------------------------------------ per-row

    def rows_down(self, x: torch.Tensor, slots: torch.Tensor, A_rows: torch.Tensor) -> torch.Tensor:
        """Row b of ``x`` through slot ``slots[b]``'s A: ``(batch, r_max, spatial'·)``, as one grouped
        convolution (the batch folded into channels, one group per row)."""
        batch, r_max = x.shape[0], A_rows.shape[-1]
        if slots.shape[0] != batch:
            raise LorakitError(f"per-row adapters were given for {slots.shape[0]} rows but the batch has {batch}")
        kernels = A_rows.index_select(0, slots).transpose(1, 2).reshape(batch * r_max, *self.kernel_shape)
        x = x if x.dtype == kernels.dtype else x.to(kernels.dtype)
        z = self.conv(x.reshape(1, batch * x.shape[1], *x.shape[2:]), kernels, groups=batch)
        return z.view(batch, r_max, -1)

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Row b gets adapter slot ``slots[b]``: one grouped convolution and one bmm."""
        slots, A_rows, B_rows, *biases = self._rows
        z = self.rows_down(x, slots, A_rows)
        delta = torch.bmm(B_rows.index_select(0, slots).transpose(1, 2), z)  # (batch, out, spatial'·)
        if biases:  # each slot's s·b (zeros for a slot without one)
            delta = delta + biases[0].index_select(0, slots).unsqueeze(-1)
        return out + delta.to(out.dtype).view_as(out)

    def extra_repr(self) -> str:
        return (f"{type(self._base).__name__}(in={self.kernel_shape[0]}, out={self.out_features}, "
                f"kernel={self.kernel_shape[1:]}), active={list(self.active)}")
