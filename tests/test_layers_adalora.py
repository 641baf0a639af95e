"""AdaLoRA's layer kind (``ΔW = s·P·diag(λ)·Q``) behind the one LoraLayer interface: its forward and
gradients, the orthogonality regularizer, and merge, per-row batches, saving and lora_layers seeing it."""

import copy

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LorakitError, add_adapter, load_adapter, lora_layers, per_row_adapters, save_adapter
from lorakit.adalora import adalora_adapters, adalora_to_lora, attach_adalora
from lorakit.layers import AdaLoraAdapter, AdaLoraLinear, LoraLayer, LoraLinear, wrapper_for
from lorakit.dense import Conv1D
from lorakit.model import merge, merge_and_unload, set_active, unmerge
from tiny_models import tiny_gpt2, tiny_llama, token_batch


def _layer(base: nn.Module, r: int, alpha: float, orth_weight: float = 0.1):
    """An AdaLoRA layer around ``base`` with one active adapter; returns ``(layer, adapter)``."""
    layer = AdaLoraLinear(base)
    adapter = layer.add_adapter("default", r=r, alpha=alpha, scaling=alpha / r)
    adapter.orth_weight = orth_weight
    layer.set_active(["default"])
    return layer, adapter


def _prune_at_random(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    """λ drawn at random and about a third of the directions pruned (mask and λ zero), as the allocator leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adalora_adapters(model, name).values():
            adapter.lam.copy_(torch.randn(adapter.r, generator=generator))
            keep = torch.rand(adapter.r, generator=generator) > 0.35
            keep[0] = True  # every module keeps one direction
            adapter.mask.copy_(keep.float())
            adapter.lam.mul_(adapter.mask)


def test_registered_as_a_layer_kind_of_linear_and_conv1d():
    assert wrapper_for(nn.Linear(4, 4), "adalora") is AdaLoraLinear
    assert wrapper_for(Conv1D(4, 4), "adalora") is AdaLoraLinear
    assert wrapper_for(nn.Embedding(4, 4), "adalora") is None
    assert wrapper_for(nn.Linear(4, 4)) is LoraLinear  # the default kind is plain LoRA
    assert issubclass(AdaLoraLinear, LoraLayer)
    with pytest.raises(LorakitError, match="layer kind 'vera' is unknown"):
        wrapper_for(nn.Linear(4, 4), "vera")


def test_layer_starts_as_the_base_and_computes_s_P_lambda_Q():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer, adapter = _layer(base, r=3, alpha=6)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(x), base(x))  # λ = 0
    with torch.no_grad():
        adapter.lam.copy_(torch.tensor([1.0, -2.0, 0.5]))
    delta = 2.0 * adapter.P @ torch.diag(adapter.lam) @ adapter.Q  # s = 6 / 3
    torch.testing.assert_close(adapter.delta(), delta.detach())
    torch.testing.assert_close(layer.delta_weight("default"), delta.detach())
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T)
    assert layer.weight is base.weight and layer.bias is base.bias


def test_gradients_of_P_lambda_Q_are_those_of_the_formula():
    torch.manual_seed(3)
    base = torch.nn.Linear(8, 7)
    layer, adapter = _layer(base, r=3, alpha=3, orth_weight=0.0)
    with torch.no_grad():
        adapter.lam.copy_(torch.tensor([0.5, -1.0, 2.0]))
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    x = torch.randn(4, 8)
    layer(x).square().sum().backward()
    P, lam, Q = (t.detach().clone().requires_grad_() for t in (adapter.P, adapter.lam, adapter.Q))
    (base(x) + (x @ Q.T * lam) @ P.T).square().sum().backward()  # s = 1
    for mine, want in ((adapter.P, P), (adapter.lam, lam), (adapter.Q, Q)):
        torch.testing.assert_close(mine.grad, want.grad)


def test_orthogonality_gradient_is_added_by_the_hooks():
    torch.manual_seed(1)
    layer, adapter = _layer(torch.nn.Linear(8, 7), r=3, alpha=3, orth_weight=0.5)
    (0.0 * layer(torch.randn(2, 8)).sum()).backward()  # no data gradient: only the regularizer's
    P, Q = adapter.P.detach(), adapter.Q.detach()
    eye = torch.eye(3)
    torch.testing.assert_close(adapter.P.grad, 0.5 * 4 * P @ (P.T @ P - eye))
    torch.testing.assert_close(adapter.Q.grad, 0.5 * 4 * (Q @ Q.T - eye) @ Q)
    # the same as autograd's gradient of γ·R
    P2, Q2 = P.clone().requires_grad_(), Q.clone().requires_grad_()
    R = (P2.T @ P2 - eye).square().sum() + (Q2 @ Q2.T - eye).square().sum()
    (0.5 * R).backward()
    torch.testing.assert_close(adapter.P.grad, P2.grad)
    torch.testing.assert_close(adapter.Q.grad, Q2.grad)


def test_orthogonality_regularizer_makes_P_and_Q_near_orthonormal():
    torch.manual_seed(2)
    layer, adapter = _layer(torch.nn.Linear(32, 32), r=4, alpha=4, orth_weight=1.0)
    opt = torch.optim.SGD([adapter.P, adapter.Q], lr=0.05)
    before = float(adapter.orthogonality_penalty().detach())
    for _ in range(300):
        (0.0 * layer(torch.randn(1, 32)).sum()).backward()
        opt.step()
        opt.zero_grad()
    assert before > 7.0 and float(adapter.orthogonality_penalty().detach()) < 1e-3


def test_lora_layers_and_the_model_records_see_it():
    model = attach_adalora(tiny_llama(), ["q_proj", "v_proj"], init_rank=4, target_rank=2)
    layers = dict(lora_layers(model))
    assert len(layers) == 4 and all(isinstance(layer, AdaLoraLinear) for layer in layers.values())
    assert set(adalora_adapters(model)) == set(layers)
    state = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.adapters.default.P" in state
    assert "model.layers.0.self_attn.q_proj.weight" in state  # the base keeps its keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_restores_the_weights(dtype):
    model = attach_adalora(tiny_llama().to(dtype), ["q_proj", "v_proj", "down_proj"], init_rank=4, target_rank=2)
    _prune_at_random(model)
    x = token_batch()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.count(".adapters.")}
    with torch.no_grad():
        want = model(x).logits.float()
        merge(model)
        merged = model(x).logits.float()
        unmerge(model)
        again = model(x).logits.float()
    atol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged, want, atol=atol, rtol=0)
    torch.testing.assert_close(again, want, atol=0 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    after = model.state_dict()
    for key, value in before.items():
        if dtype == torch.bfloat16:
            assert torch.equal(after[key], value), key  # bit for bit
        else:
            torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert not list(lora_layers(plain)) and type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits.float(), want, atol=atol, rtol=0)


def test_per_row_equals_each_row_alone_with_lora_and_adalora_adapters():
    model = attach_adalora(tiny_llama(), ["q_proj", "v_proj"], init_rank=5, target_rank=2, name="ada")
    add_adapter(model, LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), "ada2", kind="adalora")
    add_adapter(model, LoraConfig(r=2, alpha=4, target_modules=["k_proj", "o_proj"], init="random"), "lora")
    _prune_at_random(model, "ada", seed=0)
    _prune_at_random(model, "ada2", seed=1)
    rows = ["ada", "lora", None, "ada2", "ada"]
    x = token_batch(batch=len(rows), length=6)

    def alone():
        outs = []
        for b, name in enumerate(rows):
            set_active(model, *([name] if name else []))
            outs.append(model(x[b:b + 1]).logits)
        return torch.cat(outs)

    with torch.no_grad():
        with per_row_adapters(model, rows):
            mixed = model(x).logits
        torch.testing.assert_close(mixed, alone(), atol=1e-5, rtol=0)
        set_active(model)
        base = model(x).logits
        assert all((mixed[b] - base[b]).abs().max() > 1e-3 for b in (0, 1, 3, 4))
        # the allocator prunes in place: the stacks follow
        for adapter in adalora_adapters(model, "ada").values():
            adapter.mask[1:] = 0
            adapter.lam.mul_(adapter.mask)
        with per_row_adapters(model, rows):
            mixed = model(x).logits
        torch.testing.assert_close(mixed, alone(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["q_proj", "v_proj", "up_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_saved_adapter_is_plain_lora_with_the_kept_ranks_and_equals_the_forward(tmp_path, make, targets):
    from peft import PeftModel

    model = attach_adalora(make(), targets, init_rank=6, target_rank=2, alpha=12)
    _prune_at_random(model)
    with torch.no_grad():  # one module loses every direction: it leaves the file
        gone, adapter = next(iter(adalora_adapters(model).items()))
        adapter.mask.zero_()
        adapter.lam.zero_()
    kept = {p: int(((a.mask > 0) & (a.lam != 0)).sum()) for p, a in adalora_adapters(model).items()}
    x = token_batch()
    with torch.no_grad():
        want = model(x).logits
    save_adapter(model, tmp_path / "ad")
    config, tensors = adalora_to_lora(model)
    assert sorted(config.target_modules) == sorted(p for p, k in kept.items() if k)
    assert {p: config.rank_for(p) for p in config.target_modules} == {p: k for p, k in kept.items() if k}
    assert all(config.scaling_for(p) == pytest.approx(12 / 6) for p in config.target_modules)
    assert not any(gone in key for key in tensors)

    for loaded in (load_adapter(make(), tmp_path / "ad"), PeftModel.from_pretrained(make(), str(tmp_path / "ad"))):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, want, atol=1e-5, rtol=0)


def test_errors_leave_the_model_unchanged():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LorakitError, match="adalora layers wrap .*embed_tokens is a Embedding"):
        add_adapter(model, LoraConfig(target_modules=["q_proj", "embed_tokens"]), kind="adalora")
    with pytest.raises(LorakitError, match="start with init 'gaussian', not 'pissa'"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"], init="pissa"), kind="adalora")
    assert not list(lora_layers(model)) and model.state_dict().keys() == before.keys()
    attach_adalora(model, ["q_proj"], init_rank=4)
    with pytest.raises(LorakitError, match="holds adalora adapters .*cannot join"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"]), "plain")
    with pytest.raises(LorakitError, match="already holds AdaLoRA adapter"):
        attach_adalora(model, ["v_proj"], init_rank=4)


def test_an_adapter_is_its_lora_factors():
    adapter = AdaLoraAdapter(5, 4, r=3, alpha=3, scaling=1.0)
    with torch.no_grad():
        adapter.P.normal_()
        adapter.Q.normal_()
        adapter.lam.copy_(torch.tensor([2.0, 0.0, -1.0]))
    torch.testing.assert_close(adapter.B @ adapter.A, adapter.delta())
    A, B = adapter.export_factors()
    assert A.shape == (2, 5) and B.shape == (4, 2)  # the direction with λ = 0 is left out
    torch.testing.assert_close(B @ A, adapter.delta())
    version = adapter.version()
    with torch.no_grad():
        adapter.mask[0] = 0
    assert adapter.version() != version
