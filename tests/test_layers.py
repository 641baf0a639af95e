"""LoRA layers: forward maths, layouts, merge / unmerge exactness, inits, no copy of x."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LorakitError
from lorakit.layers import LoraEmbedding, LoraLinear, wrapper_for


def _randomize(layer, name="default"):
    with torch.no_grad():
        ad = layer.adapters[name]
        ad.A.normal_()
        ad.B.normal_()
    return ad


def _linear(seed=0, dtype=torch.float32, r=4, alpha=8.0, in_f=12, out_f=10):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(in_f, out_f).to(dtype))
    layer.add_adapter("default", r=r, alpha=alpha, scaling=alpha / r)
    layer.set_active(["default"])
    return layer


def test_linear_forward_is_w_x_plus_s_b_a_x():
    layer = _linear()
    ad = _randomize(layer)
    x = torch.randn(3, 5, 12)
    expected = x @ layer.weight.T + layer.bias + 2.0 * (x @ ad.A.T) @ ad.B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), 2.0 * ad.B @ ad.A)
    assert layer.weight is layer._base.weight and layer.bias is layer._base.bias  # same Parameters


def test_conv1d_layout_fan_in_fan_out():
    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs; weight (12, 10)
    layer = wrapper_for(conv)(conv)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (12, 10)
    x = torch.randn(2, 3, 12)
    assert torch.equal(layer(x), conv(x))
    layer.add_adapter("a", r=3, alpha=3, scaling=1.0)
    layer.set_active(["a"])
    ad = _randomize(layer, "a")
    assert layer.delta_weight("a").shape == conv.weight.shape == (12, 10)
    torch.testing.assert_close(layer(x), conv(x) + x @ (ad.B @ ad.A).T, rtol=1e-5, atol=1e-5)
    assert type(layer.base_layer()) is Conv1D


def test_embedding_forward_and_layout():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0)
    layer = LoraEmbedding(emb)
    layer.add_adapter("e", r=2, alpha=4, scaling=2.0, init="gaussian")
    ad = layer.adapters["e"]
    assert ad.A.shape == (2, 20) and ad.B.shape == (6, 2)
    assert torch.count_nonzero(ad.A) == 0 and torch.count_nonzero(ad.B) > 0  # PEFT's embedding init
    layer.set_active(["e"])
    _randomize(layer, "e")
    ids = torch.tensor([[1, 5, 0], [19, 2, 2]])
    expected = emb.weight[ids] + 2.0 * (ad.B @ ad.A).T[ids]
    torch.testing.assert_close(layer(ids), expected)
    assert layer.delta_weight("e").shape == (20, 6)
    assert layer.padding_idx == 0 and type(layer.base_layer()) is nn.Embedding


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_forward_with_dropout_zero_makes_no_copy_of_x():
    layer = _linear()
    _randomize(layer)
    assert layer.adapters["default"].dropout is None
    x = torch.randn(4, 7, 12)
    with _OpLog() as log:
        layer(x)
    copies = {"clone", "copy_", "_to_copy", "contiguous", "dropout", "native_dropout", "bernoulli_", "mul"}
    assert not copies & set(log.ops), log.ops
    # with dropout on, the mask is applied (the op log shows it), proving the check can fail
    layer2 = LoraLinear(nn.Linear(12, 10))
    layer2.add_adapter("d", r=2, alpha=2, scaling=1.0, dropout=0.5)
    layer2.set_active(["d"])
    layer2.train()
    with _OpLog() as log2:
        layer2(x)
    assert {"native_dropout", "bernoulli_", "dropout"} & set(log2.ops), log2.ops


def test_gradients_reach_only_a_and_b():
    layer = _linear()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    ad = _randomize(layer)
    layer(torch.randn(3, 12)).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert ad.A.grad is not None and ad.B.grad is not None and ad.A.grad.abs().sum() > 0


def test_merge_unmerge_fp32():
    layer = _linear()
    _randomize(layer)
    x = torch.randn(3, 12)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged == ("default",)
    torch.testing.assert_close(layer.weight, w0 + layer.delta_weight("default"))
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer.weight, w0 + layer.delta_weight("default"))  # merging twice: no-op
    layer.unmerge()
    assert (layer.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unmerge_is_bit_exact_in_low_precision(dtype):
    layer = _linear(dtype=dtype, in_f=64, out_f=48, r=8, alpha=16)
    assert layer.adapters["default"].A.dtype == torch.float32  # adapters train in fp32
    _randomize(layer)
    w0 = layer.weight.detach().clone()
    layer.merge()
    changed = (layer.weight != w0).float().mean()
    assert changed > 0.5  # the merge did change the weight
    expected = (w0.float() + layer.delta_weight("default")).to(dtype)
    assert torch.equal(layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    assert layer._premerge_weight is None


def _biased(dtype=torch.float32, base_bias=True):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 48, bias=base_bias).to(dtype))
    ad = layer.add_adapter("default", r=4, alpha=8, scaling=2.0, init="kaiming", bias=True)
    layer.set_active(["default"])
    with torch.no_grad():
        ad.B.normal_()
        ad.bias.normal_()
    return layer, ad


def test_a_bias_on_b_adds_s_b_trains_and_merges_into_the_layer_bias():
    layer, ad = _biased()
    x = torch.randn(3, 5, 64, requires_grad=True)
    expected = x @ layer.weight.T + layer.bias + 2.0 * ((x @ ad.A.T) @ ad.B.T + ad.bias)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    torch.testing.assert_close(ad.bias.grad, 2.0 * (2 * y.detach()).sum((0, 1)), rtol=1e-5, atol=1e-4)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(layer.bias, b0 + 2.0 * ad.bias, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # s·b counted once
        layer.unmerge()
    assert (layer.weight - w0).abs().max() <= 1e-6 and (layer.bias - b0).abs().max() <= 1e-6


def test_a_bias_on_b_unmerges_bit_exact_in_bf16_and_needs_a_layer_bias():
    layer, ad = _biased(torch.bfloat16)
    b0 = layer.bias.detach().clone()
    layer.merge()
    assert torch.equal(layer.bias, (b0.float() + 2.0 * ad.bias).to(torch.bfloat16))
    layer.unmerge()
    assert torch.equal(layer.bias, b0) and layer._premerge_bias is None
    layer, _ = _biased(base_bias=False)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = layer(x)  # it runs unmerged, as in PEFT
        with pytest.raises(LorakitError, match="no bias to merge it into"):
            layer.merge()
        assert not layer.merged
        torch.testing.assert_close(layer(x), y)
    with pytest.raises(LorakitError, match="no bias on B"):
        LoraEmbedding(nn.Embedding(10, 4)).add_adapter("e", r=2, alpha=2, scaling=1.0, bias=True)


def test_base_layer_shares_parameters_and_keeps_type():
    base = nn.Linear(4, 3)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, alpha=2, scaling=1.0)
    out = layer.base_layer()
    assert out is base and type(out) is nn.Linear and out.weight is layer.weight
    assert set(layer.state_dict()) == {"weight", "bias", "adapters.a.A", "adapters.a.B"}


def test_adapter_names_and_errors():
    layer = _linear()
    with pytest.raises(LorakitError, match="exists already"):
        layer.add_adapter("default", r=2, alpha=2, scaling=1.0)
    with pytest.raises(LorakitError, match="no adapter 'nope'"):
        layer.delta_weight("nope")
    layer.merge()
    with pytest.raises(LorakitError, match="unmerge first"):
        layer.add_adapter("other", r=2, alpha=2, scaling=1.0)


def test_several_active_adapters_sum():
    layer = _linear()
    layer.add_adapter("b", r=2, alpha=1, scaling=0.5)
    _randomize(layer, "default")
    _randomize(layer, "b")
    x = torch.randn(5, 12)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    layer.set_active(["default"])
    ya = layer(x)
    layer.set_active(["b"])
    yb = layer(x)
    layer.set_active(["default", "b"])
    torch.testing.assert_close(layer(x), ya + yb - base, rtol=1e-5, atol=1e-5)
    layer.set_disabled(True)
    torch.testing.assert_close(layer(x), base)


# ---------------------------------------------------------------------- inits

def test_gaussian_and_kaiming_inits_match_peft_distributions():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(4000, 8))
    layer.add_adapter("g", r=4, alpha=4, scaling=1.0, init="gaussian")
    layer.add_adapter("k", r=4, alpha=4, scaling=1.0, init="kaiming")
    g, k = layer.adapters["g"], layer.adapters["k"]
    assert g.A.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(g.B) == 0 and torch.count_nonzero(k.B) == 0
    bound = 1 / math.sqrt(4000)  # kaiming_uniform(a=√5) = U(-1/√in, 1/√in), as nn.Linear
    assert k.A.abs().max() <= bound and k.A.abs().max() > 0.95 * bound


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_pissa_init_keeps_the_output_and_takes_top_singular_directions(fan_in_fan_out):
    torch.manual_seed(0)
    base = Conv1D(12, 16) if fan_in_fan_out else nn.Linear(16, 12)
    with torch.no_grad():
        base.weight.normal_()
    w0 = base.weight.detach().clone()
    x = torch.randn(3, 16)
    y0 = base(x)
    layer = wrapper_for(base)(base)
    layer.add_adapter("p", r=3, alpha=6, scaling=2.0, init="pissa")
    layer.set_active(["p"])
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    w_out_in = w0.T if fan_in_fan_out else w0
    U, S, Vh = torch.linalg.svd(w_out_in)
    top3 = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    ad = layer.adapters["p"]
    torch.testing.assert_close(2.0 * ad.B @ ad.A, top3, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight_out_in(), w_out_in - top3, rtol=1e-4, atol=1e-4)
