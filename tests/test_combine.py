"""combine: 'cat' is exactly Σ w_i ΔW_i, 'svd' its best rank-r approximation; no cross terms."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LorakitError, add_adapter, attach, combine, lora_configs, lora_layers, set_active
from tiny_models import tiny_llama, token_batch


def _one_layer(A1, B1, A2, B2, alpha1=1.0, alpha2=1.0):
    model = nn.Sequential(nn.Linear(A1.shape[1], B1.shape[0], bias=False))
    attach(model, LoraConfig(r=A1.shape[0], alpha=alpha1, target_modules=["0"]), "x")
    add_adapter(model, LoraConfig(r=A2.shape[0], alpha=alpha2, target_modules=["0"]), "y")
    layer = model[0]
    with torch.no_grad():
        for name, A, B in (("x", A1, B1), ("y", A2, B2)):
            layer.adapters[name].A.copy_(A)
            layer.adapters[name].B.copy_(B)
    return model, layer


# Hand-checked: ΔW_x = 1·[[1],[0]]·[[1, 2]] = [[1, 2], [0, 0]];  ΔW_y = (4/1)·[[0],[1]]·[[0, 0.5]] = [[0, 0], [0, 2]]
A1, B1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]])
A2, B2 = torch.tensor([[0.0, 0.5]]), torch.tensor([[0.0], [1.0]])


def test_cat_is_exact_on_hand_checked_matrices():
    model, layer = _one_layer(A1, B1, A2, B2, alpha2=4.0)
    assert torch.equal(layer.delta_weight("x"), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(layer.delta_weight("y"), torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    combine(model, {"x": 0.5, "y": 3.0}, method="cat", name="xy")
    ad = layer.adapters["xy"]
    assert ad.r == 2 and ad.scaling == 1.0  # ranks add up
    assert torch.equal(layer.delta_weight("xy"), torch.tensor([[0.5, 1.0], [0.0, 6.0]]))
    assert lora_configs(model)["xy"].r == 2


def test_svd_truncates_the_weighted_sum():
    model, layer = _one_layer(A1, B1, A2, B2, alpha2=4.0)
    combine(model, {"x": 0.5, "y": 3.0}, method="svd", name="s1")  # rank max(1, 1) = 1
    # Σ w ΔW = [[0.5, 1], [0, 6]]; its best rank-1 approximation by SVD
    target = torch.tensor([[0.5, 1.0], [0.0, 6.0]])
    U, S, Vh = torch.linalg.svd(target)
    torch.testing.assert_close(layer.delta_weight("s1"), S[0] * torch.outer(U[:, 0], Vh[0]))
    combine(model, {"x": 0.5, "y": 3.0}, method="svd", name="s2", rank=2)
    torch.testing.assert_close(layer.delta_weight("s2"), target)


def test_per_factor_linear_mixing_has_cross_terms_and_ours_has_none():
    torch.manual_seed(0)
    A1, B1, A2, B2 = torch.randn(2, 6), torch.randn(5, 2), torch.randn(2, 6), torch.randn(5, 2)
    model, layer = _one_layer(A1, B1, A2, B2, alpha1=2.0, alpha2=2.0)  # scaling 1
    w = {"x": 0.5, "y": 0.5}
    target = 0.5 * layer.delta_weight("x") + 0.5 * layer.delta_weight("y")
    # PEFT-style "linear": mix each factor, then multiply -> 0.25·(B1+B2)(A1+A2), with cross terms B1A2, B2A1
    naive = (0.5 * B1 + 0.5 * B2) @ (0.5 * A1 + 0.5 * A2)
    cross = 0.25 * (B1 @ A2 + B2 @ A1)
    assert (naive - target).abs().max() > 0.1
    torch.testing.assert_close(naive - target, cross - 0.25 * (B1 @ A1 + B2 @ A2), rtol=1e-5, atol=1e-5)
    for method in ("cat", "svd"):
        combine(model, w, method=method, name=method, rank=None if method == "cat" else 4)
        torch.testing.assert_close(layer.delta_weight(method), target, rtol=1e-5, atol=1e-5)


def test_combined_adapter_runs_on_a_model():
    model, x = tiny_llama(), token_batch()
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"), "a")
    add_adapter(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj"], init="random"), "b")
    combine(model, {"a": 1.0, "b": 1.0}, method="cat", name="ab")
    set_active(model, "a", "b")
    y = model(x).logits
    set_active(model, "ab")
    torch.testing.assert_close(model(x).logits, y, rtol=1e-5, atol=1e-5)
    config = lora_configs(model)["ab"]
    ranks = {p: layer.adapters["ab"].r for p, layer in lora_layers(model) if "ab" in layer.adapters}
    assert all(config.rank_for(p) == r for p, r in ranks.items())  # the config describes the shapes
    assert set(ranks.values()) == {6, 4}


def test_combine_errors():
    model, _ = _one_layer(A1, B1, A2, B2)
    with pytest.raises(LorakitError, match="method 'ties' is unknown"):
        combine(model, {"x": 1.0}, method="ties")
    with pytest.raises(LorakitError, match=r"unknown adapter\(s\) \['z'\]"):
        combine(model, {"z": 1.0})
    with pytest.raises(LorakitError, match="already has an adapter 'x'"):
        combine(model, {"x": 1.0}, name="x")
