"""The hand-written backward of LoraLinear's training path (``_LoraLinearFunction``)
against autograd's own: gradcheck in float64 and equality with the plain formula."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.layers import LoraLinear
from lorakit.layers.linear import _LoraLinearFunction


def _layer(kind: str, bias: bool, dropout: float = 0.0, dtype=torch.float64) -> LoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias) if kind == "linear" else Conv1D(5, 6)
    if kind == "conv1d" and not bias:
        base.bias = None
    layer = LoraLinear(base.to(dtype))
    ad = layer.add_adapter("a", r=3, alpha=6, scaling=2.0, dropout=dropout)
    with torch.no_grad():
        ad.B.normal_()
    layer.set_active(["a"])
    return layer


def _reference(layer: LoraLinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``W x + b + s·B(A h)`` by autograd's own graph, no in-place op."""
    ad = layer.adapters["a"]
    weight = layer.weight.T if layer.fan_in_fan_out else layer.weight
    return F.linear(x, weight, layer.bias) + ad.scaling * F.linear(F.linear(h, ad.A), ad.B)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_every_input(kind, bias):
    layer = _layer(kind, bias)
    ad = layer.adapters["a"]
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    A, B = ad.A.detach().clone().requires_grad_(), ad.B.detach().clone().requires_grad_()
    for hh in (None, h):  # without dropout (h is x) and with a separate dropped input
        assert torch.autograd.gradcheck(
            lambda x, h, w, b, A, B: _LoraLinearFunction.apply(x, h, w, b, A, B, 2.0, layer.fan_in_fan_out),
            (x, hh, weight, b, A, B))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_training_forward_and_gradients_equal_the_formula(kind):
    layer = _layer(kind, True, dtype=torch.float32)
    layer.weight.requires_grad_(False)
    ad = layer.adapters["a"]
    x = torch.randn(3, 7, 6, requires_grad=True)
    grad = torch.randn(3, 7, 5)
    out = layer(x)
    assert out.grad_fn is not None and "LoraLinearFunction" in type(out.grad_fn).__name__
    out.backward(grad)
    got = (x.grad.clone(), ad.A.grad.clone(), ad.B.grad.clone(), layer.bias.grad.clone())
    for t in (x, ad.A, ad.B, layer.bias):
        t.grad = None
    expected = _reference(layer, x, x)
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for a, b in zip(got, (x.grad, ad.A.grad, ad.B.grad, layer.bias.grad)):
        torch.testing.assert_close(a, b)
    assert layer.weight.grad is None


def test_dropout_in_training_masks_only_the_adapter_path():
    layer = _layer("linear", True, dropout=0.5, dtype=torch.float32).train()
    ad = layer.adapters["a"]
    x = torch.randn(4, 6, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    out.sum().backward()
    got = (out.detach(), x.grad.clone(), ad.A.grad.clone())
    for t in (x, ad.A, ad.B, layer.bias, layer.weight):
        t.grad = None
    torch.manual_seed(1)
    h = ad.dropout(x)
    expected = _reference(layer, x, h)
    expected.sum().backward()
    for a, b in zip(got, (expected.detach(), x.grad, ad.A.grad)):
        torch.testing.assert_close(a, b)


def test_no_grad_and_eval_use_the_in_place_path():
    layer = _layer("linear", True, dtype=torch.float32)
    x = torch.randn(2, 6)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, _reference(layer, x, x).detach())
