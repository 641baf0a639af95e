"""DoRA (lorakit.layers.dora, dora_layers): the formula, the hand-written backward, PEFT's
gradients (which norm is detached), dropout, merge/unmerge, per-row batches and training."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, LorakitError, attach, load_adapter, save_adapter
from lorakit.layers import DoraConv, DoraEmbedding, DoraLinear, LoraLinear, wrapper_for
from lorakit.layers.dora import _DoraLinearFunction, weight_norm
from lorakit.model import add_adapter, delete_adapter, lora_layers, merge, set_active, unmerge
from lorakit.per_row import per_row_adapters
from tiny_models import tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")


def perturb(model, seed=0, std=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * std)


def dora_weight(layer, name="default"):
    """``m ⊙ (W + s·B·A) / ‖W + s·B·A‖`` as an ``(out, in)`` matrix, straight from the factors."""
    ad = layer.adapters[name]
    full = layer.weight_out_in().double() + ad.scaling * ad.B.double() @ ad.A.double()
    return ad.magnitude.double()[:, None] * full / full.norm(dim=1, keepdim=True)


def layer_of(kind, bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(6, 5, bias=bias), "conv1d": lambda: Conv1D(5, 6),
            "embedding": lambda: nn.Embedding(9, 5), "conv": lambda: nn.Conv2d(3, 5, 3, padding=1, bias=bias)}[kind]()
    layer = wrapper_for(base, "dora")(base.to(dtype))
    layer.add_adapter("default", r=3, alpha=6, scaling=2.0, init="random")
    layer.set_active(["default"])
    perturb(layer)  # m off ‖W + s·B·A‖, so c ≠ 1
    return layer


def test_registered_for_every_base_type_lora_wraps():
    assert wrapper_for(nn.Linear(2, 2), "dora") is DoraLinear
    assert wrapper_for(Conv1D(2, 2), "dora") is DoraLinear
    assert wrapper_for(nn.Embedding(2, 2), "dora") is DoraEmbedding
    assert wrapper_for(nn.Conv3d(2, 2, 1), "dora") is DoraConv


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv"])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_equals_the_formula(kind, grad):
    layer = layer_of(kind)
    W = dora_weight(layer)
    if kind == "embedding":
        x = torch.randint(0, 9, (2, 7))
        expected = F.embedding(x, W.T)
    elif kind == "conv":
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        expected = F.conv2d(x, W.view(layer.weight.shape), layer.bias, padding=1)
    else:
        x = torch.randn(2, 7, 6, dtype=torch.float64)
        expected = F.linear(x, W, layer.bias)
    with torch.set_grad_enabled(grad):
        got = layer(x)
    if grad and kind in ("linear", "conv1d"):
        assert "DoraLinearFunction" in type(got.grad_fn).__name__  # the fused training path
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gradcheck_of_the_fused_function(fan_in_fan_out):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(*((6, 5) if fan_in_fan_out else (5, 6)), dtype=torch.float64, requires_grad=True)
    b, m = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    A = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    norm = weight_norm(W.T if fan_in_fan_out else W, A, B, 2.0).double()
    assert torch.autograd.gradcheck(
        lambda x, W, b, A, B, m: _DoraLinearFunction.apply(x, W, b, A, B, m, norm, 2.0, fan_in_fan_out),
        (x, W, b, A, B, m))


def test_the_norm_is_computed_without_the_full_sum_but_equals_it():
    torch.manual_seed(1)
    W, A, B = torch.randn(7, 11), torch.randn(3, 11), torch.randn(7, 3)
    torch.testing.assert_close(weight_norm(W, A, B, 0.5), (W + 0.5 * B @ A).norm(dim=1), rtol=1e-6, atol=1e-6)


def _peft_and_ours(targets, dropout=0.0):
    """A tiny Llama with PEFT's DoRA and lorakit's, holding the same A, B and m."""
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               use_dora=True, lora_dropout=dropout))
    perturb(theirs)
    ours = attach(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True, dropout=dropout))
    state = theirs.state_dict()
    with torch.no_grad():
        for path, layer in lora_layers(ours):
            ad, prefix = layer.adapters["default"], f"base_model.model.{path}."
            emb = layer.is_embedding
            ad.A.copy_(state[prefix + ("lora_embedding_A.default" if emb else "lora_A.default.weight")])
            ad.B.copy_(state[prefix + ("lora_embedding_B.default" if emb else "lora_B.default.weight")])
            ad.magnitude.copy_(state[prefix + "lora_magnitude_vector.default.weight"])
    return theirs, ours


def test_gradients_equal_peft_and_reach_only_A_B_and_m():
    """PEFT detaches the norm (DoRA §4.3): equal gradients prove lorakit detaches the same one."""
    theirs, ours = _peft_and_ours(["q_proj", "v_proj", "embed_tokens"])
    ids = token_batch()
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids).logits.pow(2).mean().backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for path, layer in lora_layers(ours):
        ad, prefix = layer.adapters["default"], f"base_model.model.{path}."
        emb = layer.is_embedding
        torch.testing.assert_close(ad.A.grad, peft_grads[prefix + ("lora_embedding_A.default" if emb else "lora_A.default.weight")])
        torch.testing.assert_close(ad.B.grad, peft_grads[prefix + ("lora_embedding_B.default" if emb else "lora_B.default.weight")])
        torch.testing.assert_close(ad.magnitude.grad, peft_grads[prefix + "lora_magnitude_vector.default.weight"])
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained and all(n.rsplit(".", 1)[-1] in ("A", "B", "magnitude") for n in trained)


def test_dropout_drops_the_adapter_input_as_peft_does():
    """Training with dropout: ``W x + b + (c − 1) ⊙ W x̃ + c ⊙ s·B A x̃`` with x̃ = dropout(x)."""
    layer = DoraLinear(nn.Linear(6, 5).double())
    layer.add_adapter("default", r=3, alpha=6, scaling=2.0, dropout=0.5, init="random")
    layer.set_active(["default"])
    perturb(layer)
    ad = layer.adapters["default"]
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(7)
    got = layer.train()(x)
    torch.manual_seed(7)
    dropped = ad.dropout(x)
    c = ad.magnitude / (layer.weight + ad.scaling * ad.B @ ad.A).norm(dim=1)
    expected = F.linear(x, layer.weight, layer.bias) + (c - 1) * F.linear(dropped, layer.weight) \
        + c * ad.scaling * F.linear(F.linear(dropped, ad.A), ad.B)
    torch.testing.assert_close(got, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, dora_weight(layer), layer.bias))  # eval: no dropout


def test_the_magnitude_starts_at_the_norm_so_the_model_is_unchanged():
    model = tiny_llama()
    before = model(input_ids=token_batch()).logits
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    for _, layer in lora_layers(model):
        torch.testing.assert_close(layer.adapters["default"].magnitude, layer.weight.norm(dim=1))
    torch.testing.assert_close(model(input_ids=token_batch()).logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_and_unmerge_fp32(dtype):
    """fp32 keeps no copy: unmerge solves ``W' = (1 + Σ(c_i − 1)) ⊙ W + Σ c_i ⊙ ΔW_i`` for W (to rounding)."""
    model = attach(tiny_gpt2().to(dtype), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], use_dora=True))
    add_adapter(model, LoraConfig(r=2, target_modules=["c_attn"], use_dora=True), "two")
    perturb(model, std=0.02)  # a trained adapter's size: ΔW a few percent of W, m a few percent off ‖W‖
    with torch.no_grad():  # (the division by 1 + Σ(c_i − 1) is well-conditioned while each c_i is near 1)
        for _, layer in lora_layers(model):
            for ad in layer.adapters.values():
                ad.magnitude.copy_(layer.weight_norm(ad) * (1 + 0.05 * torch.randn(ad.magnitude.shape, dtype=dtype)))
    weights = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    set_active(model, "default", "two")
    expected = model(input_ids=token_batch()).logits
    merge(model, ["default"])  # one, then the other: each update against the unmerged W
    merge(model, ["two"])
    torch.testing.assert_close(model(input_ids=token_batch()).logits, expected, atol=1e-5, rtol=0)
    unmerge(model)
    for key, value in model.state_dict().items():
        if ".adapters." not in key:
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=token_batch()).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_in_low_precision_unmerges_bit_exactly(dtype):
    model = attach(tiny_llama().to(dtype), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                       use_dora=True, init="random"))
    perturb(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    path, layer = next(iter(lora_layers(model)))
    expected = (layer.weight_out_in().float() + layer.delta_weight("default").T.float()
                if layer.is_embedding else layer.weight.float() + layer.delta_weight("default"))
    merge(model)
    torch.testing.assert_close(layer.weight_out_in().float() if layer.is_embedding else layer.weight.float(),
                               expected.to(dtype).float())
    unmerge(model)
    for key, value in model.state_dict().items():
        if ".adapters." not in key:
            assert torch.equal(value, weights[key]), key


def test_per_row_equals_one_adapter_at_a_time():
    """Linear, embedding and conv DoRA layers; rows mix two adapters and the base."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.conv = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Conv1d(6, 4, 3, padding=1)

        def forward(self, ids):
            return self.conv(self.lin(self.emb(ids)).transpose(1, 2))

    torch.manual_seed(0)
    model = Net().eval()
    add_adapter(model, LoraConfig(r=2, target_modules=["emb", "lin", "conv"], use_dora=True, init="random"), "a")
    add_adapter(model, LoraConfig(r=3, target_modules=["lin", "conv"], use_dora=True, init="random"), "b")
    perturb(model)
    ids = torch.randint(0, 11, (4, 5))
    rows = ["a", "b", None, "a"]
    single = {}
    for name in ("a", "b", None):
        set_active(model, *([name] if name else []))
        single[name] = model(ids)
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(ids)
    for b, name in enumerate(rows):
        torch.testing.assert_close(mixed[b], single[name][b], atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "kaiming"])
def test_a_saved_dora_adapter_gives_peft_the_same_outputs(init, tmp_path):
    """Magnitudes under PEFT's key; a pissa init is saved for the original base, m unchanged."""
    ours = attach(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init=init))
    perturb(ours)
    expected = ours(input_ids=token_batch()).logits
    save_adapter(ours, tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(theirs(input_ids=token_batch()).logits, expected, atol=1e-5, rtol=0)
    again = load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(again(input_ids=token_batch()).logits, expected, atol=1e-5, rtol=0)


def test_a_file_without_its_magnitudes_is_refused(tmp_path):
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    save_adapter(model, tmp_path)
    tensors = {k: v for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items() if "magnitude" not in k}
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(LorakitError, match="missing lora_magnitude_vector for model.layers.0.self_attn.q_proj"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("dora_first", [False, True], ids=["lora-then-dora", "dora-then-lora"])
def test_lora_and_dora_adapters_share_layers_each_as_alone(dora_first, tmp_path):
    """A DoRA layer holds plain LoRA adapters beside DoRA ones (c = 1; a LoRA layer a DoRA adapter
    joins becomes one, the very same adapters moved): each adapter, per-row batches, merging and the
    saved files give what each adapter gives alone, and PEFT's outputs."""
    kinds = {"plain": False, "dora": True}
    order = ["dora", "plain"] if dora_first else ["plain", "dora"]
    ids = token_batch(batch=3)
    model, alone = tiny_llama(), {}
    for seed, name in enumerate(order):
        config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=kinds[name],
                            init="kaiming")
        add_adapter(model, config, name)
        one = attach(tiny_llama(), config, name)
        perturb(one, seed)  # B moved off zero; the shared model gets the very same tensors
        mine = dict(model.named_parameters())
        with torch.no_grad():
            for key, p in one.named_parameters():
                if p.requires_grad:
                    mine[key].copy_(p)
        alone[name] = one(input_ids=ids).logits.detach()
        save_adapter(one, tmp_path / f"alone-{name}", name)
    assert all(isinstance(layer, DoraLinear) for _, layer in lora_layers(model))
    for name in order:
        set_active(model, name)
        torch.testing.assert_close(model(input_ids=ids).logits, alone[name], atol=1e-5, rtol=0)
        save_adapter(model, tmp_path / name, name)
        saved = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert saved.keys() == load_file(str(tmp_path / f"alone-{name}" / "adapter_model.safetensors")).keys()
        assert any("magnitude" in k for k in saved) == kinds[name]
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / name).eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, alone[name], atol=1e-5, rtol=0)
        merge(model, [name])
        torch.testing.assert_close(model(input_ids=ids).logits, alone[name], atol=1e-5, rtol=0)
        unmerge(model)
    rows = ["dora", None, "plain"]
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(input_ids=ids).logits
    base = tiny_llama()(input_ids=ids).logits
    for b, name in enumerate(rows):
        torch.testing.assert_close(mixed[b], (alone[name] if name else base)[b], atol=1e-5, rtol=0)
    # the DoRA adapter deleted, its layers are LoRA layers again (fused q/k/v, adapters with a bias on B may join)
    delete_adapter(model, "dora")
    assert all(type(layer) is LoraLinear for _, layer in lora_layers(model))
    set_active(model, "plain")
    torch.testing.assert_close(model(input_ids=ids).logits, alone["plain"], atol=1e-5, rtol=0)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init="kaiming"), "biased")


def test_a_dora_adapter_does_not_join_layers_whose_adapters_it_cannot_hold():
    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init="kaiming"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match="bias on B"):
        add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "dora")
    assert model.state_dict().keys() == before.keys() and all(isinstance(l, LoraLinear) for _, l in lora_layers(model))
    from lorakit.adalora import attach_adalora

    ada = attach_adalora(tiny_llama(), ["q_proj"], init_rank=4)
    with pytest.raises(LorakitError, match="holds adalora adapters"):
        add_adapter(ada, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "dora")


def test_lorakit_train_dora_writes_a_dora_adapter(tmp_path):
    from lorakit.train import TrainConfig, train
    from tiny_training import save_tiny_classifier

    model = save_tiny_classifier(tmp_path / "cls")
    out = tmp_path / "run"
    train(TrainConfig(model=str(model), dora=True, data_limit=64, steps=2, batch_size=8, max_length=32, bf16=False,
                      out=str(out), progress=False))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert config["use_dora"] is True
    assert sum(k.endswith("lora_magnitude_vector") for k in saved) == 4  # 2 layers x (query, value)
    with pytest.raises(LorakitError, match="--dora is for --method lora"):
        TrainConfig(model=str(model), dora=True, method="adalora")


def test_a_bf16_base_with_fp32_factors_trains_through_the_composed_path():
    """Mixed precision (the GPU recipe): weights bf16, A, B and m fp32, input bf16."""
    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False))
    layer.add_adapter("default", r=4, alpha=8, scaling=2.0, init="random")
    layer.set_active(["default"])
    ad = layer.adapters["default"]
    assert ad.magnitude.dtype == ad.A.dtype == torch.float32
    x = torch.randn(3, 16).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    reference = F.linear(x.double(), dora_weight(layer), layer.bias.double())
    torch.testing.assert_close(out.double(), reference, atol=3e-2, rtol=3e-2)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (ad.A, ad.B, ad.magnitude))
    assert layer.weight.grad is None


def test_combine_refuses_dora_adapters(tmp_path):
    from lorakit import combine
    from lorakit.combination import combine_adapters

    model = attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="use DoRA, target_parameters"):
        combine(model, {"default": 1.0}, method="svd")
    save_adapter(model, tmp_path / "a")
    with pytest.raises(LorakitError, match="use DoRA, target_parameters"):
        combine_adapters({tmp_path / "a": 1.0}, tmp_path / "out", method="svd")


def test_per_row_on_gpt2s_conv1d_equals_one_adapter_at_a_time():
    model = tiny_gpt2()
    for name, r in (("a", 2), ("b", 4)):
        add_adapter(model, LoraConfig(r=r, target_modules=["c_attn", "c_fc"], use_dora=True, init="random"), name)
    perturb(model, std=0.02)
    ids = token_batch(batch=3)
    rows = ["b", "a", None]
    single = {}
    for name in ("a", "b", None):
        set_active(model, *([name] if name else []))
        single[name] = model(input_ids=ids).logits
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(input_ids=ids).logits
    for b, name in enumerate(rows):
        torch.testing.assert_close(mixed[b], single[name][b], atol=1e-5, rtol=0)
