"""A quantized frozen linear layer: its rounding stays within the format's stated bound,
its forward is the dequantized weight's, and gradients flow to x and to LoRA's A and B only."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, attach
from lorakit.errors import LorakitError
from lorakit.layers import LoraLinear
from lorakit.layers.quantized import NF4_BLOCK, QuantizedLinear, dense_weight, nf4_blocks, stored_bytes

NF4_HALF_GAP = 0.152  # half the widest gap between NF4 levels (-1 and -0.6962)


def linear(out_features=96, in_features=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def nf4_bound(w: torch.Tensor, q: QuantizedLinear) -> torch.Tensor:
    """Per-element bound ``0.152·a + |a − â|`` for each 64-value block (absmax a, stored as â)."""
    blocks = w.reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    stored = q.weight.dequantize_scalers(q.weight.quantized_scalers, q.weight.quantization_factor,
                                         q.weight.scaler_block_size).reshape(-1, 1).float()
    return (NF4_HALF_GAP * absmax + (absmax - stored).abs()).expand_as(blocks).reshape(w.shape)


def test_nf4_rounding_is_within_the_stated_bound():
    base = linear()
    q = QuantizedLinear.from_linear(base, "nf4")
    w, w_hat = base.weight.detach(), q.dense_weight()
    error = (w - w_hat).abs()
    bound = nf4_bound(w, q)
    assert (error <= bound + 1e-6).all()
    assert error.max() > 0.3 * bound.max()  # the bound is not vacuous: rounding does reach near it
    assert stored_bytes(q.weight) <= 0.53 * w.numel()  # ~4.1 bits a value: half a byte plus scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantization_is_torchaos_bit_for_bit(dtype):
    base = linear(out_features=576, in_features=576)  # 5,184 blocks: scales in groups of 216
    q = QuantizedLinear.from_linear(base.to(dtype), "nf4")
    assert torch.equal(q.dense_weight(), q.weight.get_original_weight())


def test_int8_rounding_is_within_half_a_step_per_row():
    base = linear()
    q = QuantizedLinear.from_linear(base, "int8")
    w, w_hat = base.weight.detach(), q.dense_weight()
    step = w.abs().amax(1, keepdim=True) / 127.5
    assert ((w - w_hat).abs() <= step / 2 + 1e-7).all()
    assert stored_bytes(q.weight) == w.numel() + 5 * w.shape[0]  # a fp32 scale and an int8 zero point (0) a row


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_forward_is_the_dequantized_weights_and_within_the_rounding_of_the_original(kind):
    base = linear()
    q = QuantizedLinear.from_linear(base, kind)
    x = torch.randn(4, 5, 128)
    out = q(x)
    reference = nn.functional.linear(x, q.dense_weight(), base.bias)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    w = base.weight.detach()
    bound = nf4_bound(w, q) if kind == "nf4" else (w.abs().amax(1, keepdim=True) / 255).expand_as(w)
    # |x·(w − ŵ)| <= Σ |x_i| · bound_i, output by output
    worst = x.abs() @ bound.T
    assert ((out - base(x)).abs() <= worst + 1e-5).all()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_on_a_quantized_base_trains_only_a_and_b(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    from lorakit.quantize import quantize_base

    quantize_base(model, kind)
    attach(model, LoraConfig(r=4, target_modules=["0"], init="random"))
    layer = model[0]
    assert isinstance(layer, LoraLinear) and layer.base_is_quantized and isinstance(model[2], QuantizedLinear)
    x = torch.randn(3, 64, requires_grad=True)
    model(x).square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"0.adapters.default.A", "0.adapters.default.B"}
    assert x.grad is not None and x.grad.abs().sum() > 0

    # the same gradients as LoRA on the dequantized weights, computed by autograd
    dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    with torch.no_grad():
        dense[0].weight.copy_(dense_weight(layer.base_layer()))
        dense[0].bias.copy_(layer.bias)
        dense[2].weight.copy_(dense_weight(model[2]))
        dense[2].bias.copy_(model[2].bias)
    ad = layer.adapters["default"]
    A, B = ad.A.detach().clone().requires_grad_(), ad.B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    h = dense[0](x2) + ad.scaling * (x2 @ A.T) @ B.T
    dense[2](torch.relu(h)).square().sum().backward()
    torch.testing.assert_close(ad.A.grad, A.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ad.B.grad, B.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


def test_quantized_layer_merges_only_through_merge_and_unload():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    attach(model, LoraConfig(r=2, target_modules=["0"], init="random"))
    from lorakit.quantize import quantize_base

    quantize_base(model, "nf4")
    with pytest.raises(LorakitError, match="merge_and_unload"):
        model[0].merge()


def test_nf4_blocks_fit_torchaos_constraints():
    assert nf4_blocks(576 * 576) == (64, 216)  # SmolLM2's attention: 5,184 blocks
    assert nf4_blocks(2048 * 2048) == (64, 256)
    assert nf4_blocks(100 * 3) is None
