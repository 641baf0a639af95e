"""combine: 'cat' is exactly Σ w_i ΔW_i, 'svd' its best rank-r approximation; no cross terms;
the pruning methods (ties, magnitude_prune, dare_*) equal PEFT's ``*_svd`` combinations."""

import pytest
import torch
from torch import nn

from lorakit import (
    LoraConfig, LorakitError, add_adapter, attach, combine, load_adapter, lora_configs, lora_layers, save_adapter,
    set_active,
)
from lorakit.combination import combine_adapters
from tiny_models import tiny_gpt2, tiny_llama, token_batch


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
    with pytest.raises(LorakitError, match="method 'linear' is unknown"):
        combine(model, {"x": 1.0}, method="linear")
    with pytest.raises(LorakitError, match=r"unknown adapter\(s\) \['z'\]"):
        combine(model, {"z": 1.0})
    with pytest.raises(LorakitError, match="already has an adapter 'x'"):
        combine(model, {"x": 1.0}, name="x")
    with pytest.raises(LorakitError, match="rank does not apply to method 'cat'"):
        combine(model, {"x": 1.0}, rank=2)
    with pytest.raises(LorakitError, match="method 'ties' needs a density in \\(0, 1\\].*got None"):
        combine(model, {"x": 1.0, "y": 1.0}, method="ties")
    with pytest.raises(LorakitError, match="needs a density.*got 0"):
        combine(model, {"x": 1.0, "y": 1.0}, method="dare_linear", density=0)
    with pytest.raises(LorakitError, match="density applies to the pruning methods .* not to 'svd'"):
        combine(model, {"x": 1.0, "y": 1.0}, method="svd", density=0.5)
    with pytest.raises(LorakitError, match="majority_sign 'most' is unknown"):
        combine(model, {"x": 1.0, "y": 1.0}, method="ties", density=0.5, majority_sign="most")
    attach(model, LoraConfig(r=1, target_modules=["0"], init="pissa"), "p")
    with pytest.raises(LorakitError, match=r"adapter\(s\) \['p'\] started from an init that rewrote .*\(pissa\)"):
        combine(model, {"x": 1.0, "p": 1.0})
    with pytest.raises(LorakitError, match="adapter weights must be finite numbers, got {'x': 'half'}"):
        combine(model, {"x": "half"})
    assert set(lora_configs(model)) == {"x", "y", "p"}  # nothing was added by the failed calls


# ---------------------------------------------------------------------- the pruning methods

# Full-rank adapters (r = 2 on a 2×2 layer, scaling 1) so that ΔW = A exactly and no truncation hides anything.
DX = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
DY = torch.tensor([[-4.0, -2.0], [0.1, 0.2]])


@pytest.mark.parametrize("method, majority, expected", [
    # density 0.5 keeps 2 of 4 entries: Px = [[3, 0], [0, 2]], Py = [[-4, -2], [0, 0]]; weights 1 and 0.5
    ("magnitude_prune", "total", [[3.0 - 2.0, -1.0], [0.0, 2.0]]),
    # total: signs of Px + Py = [[-1, -2], [0, 2]] -> (-, -, +, +): entry (0,0) keeps y's -4·0.5 alone
    ("ties", "total", [[-2.0, -1.0], [0.0, 2.0]]),
    # frequency: sign counts [[0, -1], [0, 1]] -> (+, -, +, +): entry (0,0) keeps x's 3 alone
    ("ties", "frequency", [[3.0, -1.0], [0.0, 2.0]]),
])
def test_pruning_methods_on_hand_checked_matrices(method, majority, expected):
    model, layer = _one_layer(DX, torch.eye(2), DY, torch.eye(2), alpha1=2.0, alpha2=2.0)
    assert torch.equal(layer.delta_weight("x"), DX) and torch.equal(layer.delta_weight("y"), DY)
    combine(model, {"x": 1.0, "y": 0.5}, method=method, name="m", density=0.5, majority_sign=majority)
    torch.testing.assert_close(layer.delta_weight("m"), torch.tensor(expected), rtol=0, atol=1e-6)


def test_dare_keeps_a_density_fraction_rescaled_and_is_seeded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    attach(model, LoraConfig(r=4, alpha=4, target_modules=["0"], init="random"), "x")
    layer = model[0]
    delta = layer.delta_weight("x")
    combine(model, {"x": 2.0}, method="dare_linear", name="d", rank=48, density=0.3,
            generator=torch.Generator().manual_seed(1))
    got = layer.delta_weight("d")
    kept = got.abs() > 1e-4
    # every entry is dropped (0) or kept and rescaled: 2·ΔW / 0.3
    torch.testing.assert_close(got[kept], (2.0 * delta / 0.3)[kept], rtol=1e-4, atol=1e-5)
    assert float(got[~kept].abs().max()) < 1e-4
    fraction = float(kept.float().mean())  # 3,072 Bernoulli(0.3) draws: sd 0.008
    assert abs(fraction - 0.3) < 0.035
    combine(model, {"x": 2.0}, method="dare_linear", name="same", rank=48, density=0.3,
            generator=torch.Generator().manual_seed(1))
    combine(model, {"x": 2.0}, method="dare_linear", name="other", rank=48, density=0.3,
            generator=torch.Generator().manual_seed(2))
    assert torch.equal(layer.delta_weight("same"), got)
    assert not torch.allclose(layer.delta_weight("other"), got)


# ---------------------------------------------------------------------- against PEFT

peft = pytest.importorskip("peft")

PEFT_TYPES = {"svd": "svd", "magnitude_prune": "magnitude_prune_svd", "ties": "ties_svd",
              "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd"}


def _two_adapters(make, targets, tmp_path):
    """The same two random adapters on a lorakit model and on a PEFT model (through files)."""
    model = make()
    attach(model, LoraConfig(r=4, alpha=8, target_modules=targets, init="random"), "a")
    add_adapter(model, LoraConfig(r=4, alpha=4, target_modules=targets, init="random"), "b")
    save_adapter(model, tmp_path / "a", "a")
    save_adapter(model, tmp_path / "b", "b")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    return model, theirs


def _peft_deltas(peft_model, name):
    return {path: module.get_delta_weight(name).detach()
            for path, module in peft_model.base_model.model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer) and
            (name in module.lora_A or name in module.lora_embedding_A)}


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                                           (tiny_gpt2, ["c_attn", "c_fc", "wte"])],  # Conv1D and an embedding
                         ids=["llama", "gpt2"])
def test_equals_peft_add_weighted_adapter(make, targets, tmp_path):
    """Same adapters, weights, density and rank: ΔW equal to PEFT's ``*_svd`` at every layer. For DARE the
    generator starts where PEFT's draws start: PEFT first builds the new adapter's layers (which draws from
    the global generator), so a plain ``svd`` combination from the same seed tells that state."""
    ours, theirs = _two_adapters(make, targets, tmp_path)
    weights = {"a": 0.7, "b": -0.4}
    for method, peft_type in PEFT_TYPES.items():
        for majority in ("total", "frequency") if "ties" in method else ("total",):
            name = f"{method}_{majority}"
            density = None if method == "svd" else 0.4
            torch.manual_seed(5)
            theirs.add_weighted_adapter(list(weights), list(weights.values()), f"probe_{name}", combination_type="svd")
            state = torch.get_rng_state()
            torch.manual_seed(5)
            theirs.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type=peft_type,
                                        density=density, majority_sign_method=majority)
            generator = torch.Generator()
            generator.set_state(state)
            combine(ours, weights, method=method, name=name, density=density, majority_sign=majority,
                    generator=generator)
            expected = _peft_deltas(theirs, name)
            layers = dict(lora_layers(ours))
            assert set(expected) == {p for p, layer in layers.items() if name in layer.adapters}
            for path, delta in expected.items():
                torch.testing.assert_close(layers[path].delta_weight(name), delta, rtol=1e-5, atol=1e-5,
                                           msg=f"{name} at {path}")
            if method != "svd":  # the pruning did something: the result is not the plain truncated sum
                plain = _peft_deltas(theirs, f"probe_{name}")
                assert any((plain[p] - d).abs().max() > 1e-3 for p, d in expected.items())


def test_folders_combine_as_on_a_model_and_load_in_peft(tmp_path):
    ours, _ = _two_adapters(tiny_llama, ["q_proj", "v_proj"], tmp_path)
    combine(ours, {"a": 0.6, "b": 0.6}, method="ties", name="t", density=0.5, rank=6)
    out = combine_adapters({tmp_path / "a": 0.6, tmp_path / "b": 0.6}, tmp_path / "t", "ties", 6, density=0.5)
    x = token_batch()
    set_active(ours, "t")
    with torch.no_grad():
        expected = ours(x).logits
    loaded = load_adapter(tiny_llama(), out).eval()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert lora_configs(loaded)["default"].r == 6


def test_folders_that_do_not_combine(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import tiny_bert_classifier

    ours, _ = _two_adapters(tiny_llama, ["q_proj"], tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    save_adapter(attach(wide, LoraConfig(r=4, target_modules=["q_proj"])), tmp_path / "wide")
    with pytest.raises(LorakitError, match="made for different models"):
        combine_adapters({tmp_path / "a": 1.0, tmp_path / "wide": 1.0}, tmp_path / "out", "svd")
    head = attach(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    save_adapter(head, tmp_path / "head")
    with pytest.raises(LorakitError, match="made for different models"):  # a BERT's adapter and a Llama's
        combine_adapters({tmp_path / "head": 1.0, tmp_path / "a": 1.0}, tmp_path / "out", "svd")
    plain = attach(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], modules_to_save=[]))
    save_adapter(plain, tmp_path / "plain")
    with pytest.raises(LorakitError, match="holds the full tensor .*classifier.*LoRA factors only"):
        combine_adapters({tmp_path / "head": 1.0, tmp_path / "plain": 1.0}, tmp_path / "out", "svd")
    with pytest.raises(LorakitError, match="--out .*/a is not an empty folder"):  # never over an input
        combine_adapters({tmp_path / "a": 1.0, tmp_path / "b": 1.0}, tmp_path / "a", "svd")
    with pytest.raises(LorakitError, match="finite numbers"):
        combine_adapters({tmp_path / "a": float("nan"), tmp_path / "b": 1.0}, tmp_path / "out", "svd")
    with pytest.raises(LorakitError, match="needs a density"):
        combine_adapters({tmp_path / "a": 1.0, tmp_path / "b": 1.0}, tmp_path / "out", "ties")
    assert not (tmp_path / "out").exists()
