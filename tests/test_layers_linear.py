"""LoraLinear: its hand-written training backward (``_LoraLinearFunction``) against autograd's
own (gradcheck in float64, equality with the plain formula), and LoraLinear under torch.compile: no graph break, no recompilation when the adapter is switched,
and a compiled LoRA model computes what the eager one does (outputs and gradients).

The graph-break and recompile counts use the ``aot_eager`` backend (dynamo's capture and
AOT autograd, no code generation: seconds); the equality test compiles with the default
backend (inductor: C++ kernels on CPU), which is what ``lorakit train --compile`` uses.
"""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig
from lorakit.layers import LoraLinear
from lorakit.layers.linear import _LoraLinearFunction
from lorakit.model import add_adapter, attach, set_active
from tiny_models import tiny_llama, token_batch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def two_adapter_llama():
    model = tiny_llama()
    for name in ("a", "b"):
        add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"), name)
    set_active(model, "a")
    return model.train()


def test_a_lora_model_compiles_as_one_graph():
    model = two_adapter_llama()
    ids = token_batch()
    explanation = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_switching_adapters_does_not_recompile_and_each_gives_its_own_result():
    model = two_adapter_llama()
    ids = token_batch()
    compiled = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend="aot_eager")
    losses = {}
    for name in ("a", "b", "a", "b", "a", "b"):
        set_active(model, name)
        loss = compiled(ids)
        loss.backward()
        losses.setdefault(name, []).append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    for name in ("a", "b"):
        set_active(model, name)
        eager = model(input_ids=ids, labels=ids).loss.item()
        assert all(abs(loss - eager) < 1e-6 for loss in losses[name])
    assert abs(losses["a"][0] - losses["b"][0]) > 1e-4  # the switch really changed the model


class Block(nn.Module):
    """Two LoRA targets reading one input and a third after them, as in a transformer MLP."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_a_compiled_lora_model_matches_eager():
    torch.manual_seed(0)
    eager = attach(Block(), LoraConfig(r=4, alpha=8, target_modules=["gate", "up", "down"], init="random"))
    compiled = copy.deepcopy(eager)
    compiled.compile()  # in place, as `lorakit train --compile`: the state-dict keys stay
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(3, 5, 16)
    grad = torch.randn(3, 5, 16)
    results = []
    for model in (eager, compiled):
        for _ in range(2):  # the second pass: the eager model's shared-input group is computing now
            model.zero_grad()
            out = model(x)
            out.backward(grad)
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out_e, grads_e), (out_c, grads_c) = results
    assert torch.allclose(out_e, out_c, atol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == 6
    for name in grads_e:
        assert torch.allclose(grads_e[name], grads_c[name], atol=1e-5), name


@pytest.mark.cuda
def test_on_cuda_a_compiled_lora_model_matches_eager_and_switches_without_recompiling():
    model = two_adapter_llama().cuda()
    ids = token_batch().cuda()
    compiled = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss)  # inductor: Triton kernels
    for name in ("a", "b", "a"):
        set_active(model, name)
        loss = compiled(ids)
        loss.backward()
        eager = model(input_ids=ids, labels=ids).loss
        assert abs(loss.item() - eager.item()) < 1e-4
    assert sum(counters["recompiles"].values()) == 0


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


def dropped(ad, x: torch.Tensor) -> torch.Tensor:
    """``x`` as adapter ``ad`` reads it: through its dropout, if it has one."""
    return x if ad.dropout is None else ad.dropout(x)


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


@pytest.mark.parametrize("kind,dropout", [("linear", 0.0), ("conv1d", 0.0), ("linear", 0.5)])
@pytest.mark.parametrize("frozen", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_one_function_is_as_close_to_fp32_as_autocast_itself(kind, dropout, frozen):
    """As `lorakit train --bf16` runs: the layer casts its tensors once and computes in bf16 with
    autocast off (fewer kernels); autocast's own graph of the formula is the yardstick (with
    dropout, each forward draws the same mask from the same seed)."""
    layer = _layer(kind, True, dropout=dropout, dtype=torch.float32)
    layer.weight.requires_grad_(False)
    layer.weight.data = layer.weight.data.to(frozen)
    ad = layer.adapters["a"]
    x = torch.randn(3, 7, 6, requires_grad=True)
    grad = torch.randn(3, 7, 5)

    def run(forward):
        for t in (x, ad.A, ad.B, layer.bias):
            t.grad = None
        torch.manual_seed(1)
        out = forward()
        out.backward(grad.to(out.dtype))
        return out.detach(), [t.grad.clone() for t in (x, ad.A, ad.B, layer.bias)]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "LoraLinearFunction" in type(layer(x).grad_fn).__name__
        out, grads = run(lambda: layer(x))
        auto_out, auto_grads = run(lambda: _reference(layer, x, dropped(ad, x)))
    fp32 = copy.deepcopy(layer)
    fp32.weight.data = fp32.weight.data.float()
    torch.manual_seed(1)
    ref_out = _reference(fp32, x, dropped(ad, x))
    ref_grads = torch.autograd.grad(ref_out, (x, fp32.adapters["a"].A, fp32.adapters["a"].B, fp32.bias), grad)
    ref_out = ref_out.detach()

    def error(a, b):  # relative, in the Frobenius norm
        return float((a.float() - b).norm() / b.norm())

    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads[1:])
    assert error(out, ref_out) <= 2 * error(auto_out, ref_out) + 0.01
    for got, auto, ref in zip(grads, auto_grads, ref_grads):
        assert error(got, ref) <= 2 * error(auto, ref) + 0.01


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
