"""A quantized frozen base (QLoRA): store a model's frozen linear weights in nf4 or int8.

>>> report = quantize_base(model, "nf4")     # before or after attach()
>>> print(report.describe())
nf4: 210 linear layers, 437.5 MB -> 70.9 MB (0.16x); kept dense: lm_head (the output head)

Every ``nn.Linear`` of the model, adapted by LoRA or not, becomes a frozen
:class:`lorakit.layers.quantized.QuantizedLinear` at the same module path with the same
parameter names; LoRA's A and B stay in full precision and are the only tensors that
train. What is left dense, and why: the output head and a classification head, any
weight shared with another module (SmolLM2 ties its head to the embedding; the embedding
is not a linear layer), modules_to_save, and nf4 weights whose size is not a multiple of 64.

An adapter trained on a quantized base is an ordinary adapter file: it loads onto the
quantized base and onto the original full-precision one alike. ``merge_and_unload``
(:mod:`lorakit.merging`) merges into a quantized base through :func:`merged_base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.heap import release_freed_memory
from lorakit.layers import LoraLayer, SavedModule
from lorakit.layers.quantized import (
    QUANT_KINDS,
    QuantizedLinear,
    dense_weight,
    dequantize_tensor,
    nf4_blocks,
    quantization_kind,
    quantize_tensor,
    stored_bytes,
)
from lorakit.targets import Conv1D, output_heads, replace_module, tied_paths, walk


@dataclass
class QuantizeReport:
    """What :func:`quantize_base` did.

    Attributes:
        kind: ``"nf4"`` or ``"int8"``.
        layers: module paths quantized.
        dense_bytes: bytes those weights held before.
        quantized_bytes: bytes they hold now (data and scales).
        kept: module path -> why it was left dense.
    """

    kind: str
    layers: list[str] = field(default_factory=list)
    dense_bytes: int = 0
    quantized_bytes: int = 0
    kept: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        ratio = self.quantized_bytes / self.dense_bytes if self.dense_bytes else 0.0
        line = (f"{self.kind}: {len(self.layers)} linear layers, {self.dense_bytes / 1e6:.1f} MB -> "
                f"{self.quantized_bytes / 1e6:.1f} MB ({ratio:.2f}x)")
        if self.kept:
            shown = ", ".join(f"{p} ({why})" for p, why in list(self.kept.items())[:3])
            more = f" and {len(self.kept) - 3} more" if len(self.kept) > 3 else ""
            line += f"; kept dense: {shown}{more}"
        return line


def quantize_base(model: nn.Module, kind: str = "nf4") -> QuantizeReport:
    """Store the linear weights of ``model`` as ``kind`` (``"nf4"`` or ``"int8"``), frozen, in place.

    Works before or after :func:`lorakit.model.attach`: a LoRA layer keeps its adapters and
    gets a quantized base. Quantizing happens on the weights' device, one layer at a time.

    Returns:
        a :class:`QuantizeReport` (layers, bytes before and after, what stayed dense).

    Raises:
        LorakitError: an unknown ``kind``, or the model has no linear layer to quantize.
    """
    if kind not in QUANT_KINDS:
        raise LorakitError(f"quantization {kind!r} is unknown; choose one of {list(QUANT_KINDS)}")
    modules = walk(model)
    report = QuantizeReport(kind)
    for path, module in _frozen_linears(model, modules, report.kept):
        linear = module._base if isinstance(module, LoraLayer) else module
        if kind == "nf4" and nf4_blocks(linear.weight.numel()) is None:
            report.kept[path] = f"{linear.weight.numel()} values, not a multiple of 64"
            continue
        report.dense_bytes += stored_bytes(linear.weight)
        quantized = QuantizedLinear.from_linear(linear, kind)
        report.quantized_bytes += stored_bytes(quantized.weight)
        _set_base(model, modules, path, quantized)
        report.layers.append(path)
    if not report.layers:
        raise LorakitError(f"{type(model).__name__} has no nn.Linear or Conv1D to quantize"
                           + (f" (kept dense: {report.kept})" if report.kept else ""))
    release_freed_memory()  # the dense weights just replaced: otherwise the process keeps their pages
    return report


def _frozen_linears(model: nn.Module, modules: dict[str, nn.Module], kept: dict[str, str]):
    """``(path, module)`` of every plain ``nn.Linear`` or ``Conv1D`` (bare or under a LoRA layer) to
    quantize; the others of those types go into ``kept`` with the reason."""
    heads = set(output_heads(model, modules))
    inside_saved = tuple(p + "." for p, m in modules.items() if isinstance(m, SavedModule))
    candidates = []
    for path, module in modules.items():
        linear = module._base if isinstance(module, LoraLayer) else module
        if type(linear) not in (nn.Linear, Conv1D) or (inside_saved and path.startswith(inside_saved)):
            continue
        if path in heads:
            kept[path] = "the output head"
        else:
            candidates.append(path)
    for path in tied_paths(modules, candidates):
        kept[path] = "its weight is shared with another module"
    return [(p, modules[p]) for p in candidates if p not in kept]


def _set_base(model: nn.Module, modules: dict[str, nn.Module], path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``, or under the LoRA layer there (sharing its ``weight``)."""
    module = modules[path]
    if isinstance(module, LoraLayer):
        module.replace_base(new)
    else:
        replace_module(model, modules, path, new)


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Turn every :class:`QuantizedLinear` of ``model`` back into the ``nn.Linear`` (or GPT-2's
    ``Conv1D``) it was, with its dequantized weight in ``dtype`` (default: the dtype it was
    quantized from), in place.

    Returns:
        the module paths changed.
    """
    modules = walk(model)
    changed = []
    for path, module in list(modules.items()):
        linear = module._base if isinstance(module, LoraLayer) else module
        if isinstance(linear, QuantizedLinear):
            _set_base(model, modules, path, _dense_linear(linear.dense_weight(dtype), linear.bias, linear.from_conv1d))
            changed.append(path)
    return changed


def _dense_linear(weight: torch.Tensor, bias: nn.Parameter | None, conv1d: bool = False) -> nn.Module:
    """A frozen dense layer of ``weight`` ``(out, in)``: an ``nn.Linear``, or with ``conv1d`` a
    transformers ``Conv1D`` (its weight stored ``(in, out)``, as GPT-2's checkpoints hold it)."""
    if conv1d:
        with torch.device("meta"):
            linear = Conv1D(weight.shape[0], weight.shape[1])
        linear.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
    else:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = bias
    return linear


# ---------------------------------------------------------------- merging into a quantized base


@dataclass
class MergeRounding:
    """The rounding a merge into a quantized base introduced, against the exact fp32 sum
    ``Ŵ + ΔW`` (``Ŵ`` the dequantized base).

    Attributes:
        stored: how the merged weights are kept (in the base's compute dtype, or quantized again).
        layers: how many layers were merged this way.
        max_abs: the largest ``|stored − exact|`` over all of them.
        relative: ``‖stored − exact‖ / ‖exact‖`` (Frobenius, all layers together).
    """

    stored: str = ""
    layers: int = 0
    max_abs: float = 0.0
    error_sq: float = 0.0
    exact_sq: float = 0.0

    @property
    def relative(self) -> float:
        return (self.error_sq / self.exact_sq) ** 0.5 if self.exact_sq else 0.0

    def add(self, stored: torch.Tensor, exact: torch.Tensor) -> None:
        diff = stored.float() - exact
        self.layers += 1
        self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.error_sq += float(diff.square().sum())
        self.exact_sq += float(exact.square().sum())

    def describe(self) -> str:
        return (f"merged {self.layers} LoRA layers into a quantized base, kept in {self.stored}: rounding "
                f"{100 * self.relative:.3g}% of the merged weights' norm (largest {self.max_abs:.3g}); "
                "lorakit export --merged merges into the original full-precision base instead")


@torch.no_grad()
def merged_base(layer: LoraLayer, names: list[str], rounding: MergeRounding, requantize: bool = False) -> nn.Module:
    """A new base module for ``layer`` (a LoRA layer on a quantized base) holding
    ``Ŵ + Σ ΔW`` of adapters ``names``, computed in fp32, then stored in the dtype the base
    computes in (:func:`compute_dtype`: bf16 for a base quantized from bf16) or, with
    ``requantize``, quantized again (bitsandbytes 4-bit as nf4, 8-bit as int8). Adds the
    rounding to ``rounding``. The layer itself is left unchanged.
    """
    base = layer.base_layer()
    from_conv1d = getattr(base, "from_conv1d", False)
    exact = dense_weight(base, torch.float32)
    for name in names:
        exact += layer.delta_weight(name)
    bias = layer.merged_bias(names)  # with the adapters' biases on B (lora_bias), if any
    if bias is not None and bias is not base.bias:
        bias = nn.Parameter(bias.to(base.bias.dtype), requires_grad=False)
    if requantize:
        kind = {"bnb-4bit": "nf4", "bnb-8bit": "int8"}.get(quantization_kind(base), quantization_kind(base))
        stored = quantize_tensor(exact.to(compute_dtype(base)), kind)
        rounding.stored = kind
        rounding.add(dequantize_tensor(stored, torch.float32), exact)
        return QuantizedLinear(stored, bias, kind, from_conv1d)
    stored = exact.to(compute_dtype(base))
    rounding.stored = str(stored.dtype).removeprefix("torch.")
    rounding.add(stored, exact)
    return _dense_linear(stored, bias, from_conv1d)


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a quantized linear layer dequantizes to: the dtype a :class:`QuantizedLinear`
    was quantized from, a bitsandbytes 4-bit layer's ``compute_dtype``, else fp32."""
    if isinstance(linear, QuantizedLinear):
        return linear.weight.dtype
    return getattr(linear, "compute_dtype", None) or torch.float32
