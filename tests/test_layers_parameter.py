"""LoRA on parameters (lorakit.layers.parameter, ``target_parameters``): seed 001's
parametrization on a plain nn.Linear weight, fused mixture-of-experts weights of tiny
Mixtral and GPT-OSS models (PEFT's expert layout, both orientations), training, merge,
unload, state-dict keys, refusals, and PEFT both ways."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lorakit import LoraConfig, LorakitError, attach, load_adapter, save_adapter
from lorakit.layers import LoraParameter, ParameterHost
from lorakit.model import delete_adapter, lora_layers, merge, merge_and_unload, set_active, unmerge
from lorakit.per_row import per_row_adapters
from tiny_models import tiny_gpt_oss, tiny_mixtral

peft = pytest.importorskip("peft")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def perturb(model, seed=0, std=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * std)


class Seed001(nn.Module):
    """Seed 001's ``LoRAParametrization`` (W + B·A·scale), with factors given."""

    def __init__(self, A, B, scale):
        super().__init__()
        self.A, self.B, self.scale = A, B, scale

    def forward(self, W):
        return W + torch.matmul(self.B, self.A).view(W.shape) * self.scale


def test_a_linear_weight_computes_what_seed_001_computes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    ours = attach(copy.deepcopy(net), LoraConfig(r=2, alpha=4, target_parameters=["0.weight"], init="random"))
    ad = next(layer for _, layer in lora_layers(ours)).adapters["default"]
    reference = copy.deepcopy(net)
    parametrize.register_parametrization(reference[0], "weight", Seed001(ad.A.detach(), ad.B.detach(), ad.scaling))
    torch.testing.assert_close(ours(x), reference(x))
    assert isinstance(ours[0], ParameterHost) and type(ours[0]._host) is nn.Linear  # no parametrization left on it
    assert list(ours.state_dict())[:2] == ["0.weight", "0.bias"]


def experts_delta(layer, ad):
    """ΔW_e = s·B_e·A_e per expert, PEFT's layout: A's rows e·r…, B's columns e, e + E, …"""
    E, r = layer.experts, ad.r
    blocks = [ad.scaling * ad.B[:, e::E] @ ad.A[e * r:(e + 1) * r] for e in range(E)]  # (out, in) each
    return torch.stack([b.T if layer.transposed else b for b in blocks])


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_gpt_oss])
def test_experts_compute_with_W_plus_each_experts_update(make):
    model = attach(make(), LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS, init="random"))
    reference = make()
    with torch.no_grad():
        for path, layer in lora_layers(model):
            reference.get_parameter(path).add_(experts_delta(layer, layer.adapters["default"]))
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=1e-6)
    assert (logits(model) - logits(make())).abs().max() > 1e-3


def test_the_models_own_keys_do_not_change_and_only_A_and_B_train():
    model = tiny_mixtral()
    keys = list(model.state_dict())
    attach(model, LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    assert [k for k in model.state_dict() if ".adapters." not in k] == keys
    model.train()
    model(input_ids=IDS).logits.square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == 2 * 2 * 2 and all(n.endswith((".A", ".B")) for n in trained)
    before = logits(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    assert (logits(model) - before).abs().max() > 0


def test_merge_unmerge_and_unload():
    model = attach(tiny_mixtral(), LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS, init="random"))
    perturb(model)
    expected = logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


def test_delete_gives_the_module_back():
    model = attach(tiny_mixtral(), LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"]))
    assert isinstance(model.model.layers[0].mlp.experts, ParameterHost)
    delete_adapter(model, "default")
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert not list(lora_layers(model))


def test_two_adapters_switch_and_sum():
    model = attach(tiny_mixtral(), LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS, init="random"), "a")
    attach(model, LoraConfig(r=3, target_modules=[], target_parameters=EXPERTS, init="random"), "b")
    perturb(model)
    out = {}
    for names in (("a",), ("b",), ("a", "b"), ()):
        set_active(model, *names)
        out[names] = logits(model)
    reference = tiny_mixtral()
    with torch.no_grad():
        for path, layer in lora_layers(model):
            for ad in layer.adapters.values():
                reference.get_parameter(path).add_(experts_delta(layer, ad))
    torch.testing.assert_close(out[("a", "b")], logits(reference), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[()], logits(tiny_mixtral()))
    assert (out[("a",)] - out[("b",)]).abs().max() > 1e-3


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_gpt_oss])
def test_lorakit_to_peft_and_back(make, tmp_path):
    ours = attach(make(), LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS,
                                     rank_pattern={"experts.down_proj": 3}, init="random"))
    perturb(ours)
    expected = logits(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_adapter(make(), tmp_path)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", [EXPERTS, ["experts.down_proj"]])
def test_peft_to_lorakit(params, tmp_path):
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                                 target_parameters=params, init_lora_weights=False))
    perturb(theirs)
    expected = logits(theirs.eval())
    theirs.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(load_adapter(tiny_mixtral(), tmp_path)), expected, atol=1e-5, rtol=0)


def test_peft_and_lorakit_agree_on_a_linear_weight(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    ours = attach(copy.deepcopy(net), LoraConfig(r=2, target_parameters=["2.weight"], init="random"))
    save_adapter(ours, tmp_path)
    torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path)(x), ours(x))


def test_what_lora_on_a_parameter_refuses():
    with pytest.raises(LorakitError, match="DoRA does not apply to target_parameters"):
        LoraConfig(target_parameters=EXPERTS, use_dora=True)
    with pytest.raises(LorakitError, match="dropout 0.1 cannot apply to target_parameters"):
        LoraConfig(target_parameters=EXPERTS, dropout=0.1)
    with pytest.raises(LorakitError, match=r"\['experts.up'\] matched no parameter"):
        attach(tiny_mixtral(), LoraConfig(target_modules=[], target_parameters=["experts.up"]))
    with pytest.raises(LorakitError, match="starts with init 'gaussian' or 'kaiming' or 'random', not 'pissa'"):
        attach(tiny_mixtral(), LoraConfig(target_modules=[], target_parameters=EXPERTS, init="pissa"))
    with pytest.raises(LorakitError, match=r"input_layernorm.weight, a parameter of shape \(16,\), not \(out, in\)"):
        attach(tiny_mixtral(), LoraConfig(target_modules=[], target_parameters=["input_layernorm.weight"]))
    with pytest.raises(LorakitError, match="a parameter of a LoRA target module"):
        attach(tiny_mixtral(), LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_gpt_oss], ids=["mixtral", "gpt-oss"])
def test_per_row_adapters_on_expert_parameters_give_each_row_its_own_adapter(make):
    """Rows choosing other adapters (experts only; experts, router and attention; none) in one
    batch give what each row gives alone with its adapter active: the host runs once per choice."""
    model = make()
    attach(model, LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS, init="random"), "experts")
    from lorakit.model import add_adapter
    router = "router.weight" if make is tiny_gpt_oss else "gate.weight"
    add_adapter(model, LoraConfig(r=3, target_modules=["q_proj"], target_parameters=[*EXPERTS, router],
                                  init="random"), "all")
    perturb(model)
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(2))
    rows = ["experts", "all", None, "experts"]
    alone = []
    for b, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                from lorakit.model import disable_adapters
                with disable_adapters(model):
                    alone.append(model(input_ids=ids[b:b + 1]).logits)
            else:
                set_active(model, name)
                alone.append(model(input_ids=ids[b:b + 1]).logits)
    with torch.no_grad(), per_row_adapters(model, rows):
        together = model(input_ids=ids).logits
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-3 and (alone[0] - alone[2]).abs().max() > 1e-3  # not void
    set_active(model, "all")
    with torch.no_grad():
        active = model(input_ids=ids).logits
        with per_row_adapters(model, ["all"] * 4):  # one choice: one run, as the adapter active
            torch.testing.assert_close(model(input_ids=ids).logits, active, atol=1e-6, rtol=0)


def test_the_module_comes_back_with_its_parameters_in_their_order():
    model = attach(tiny_mixtral(), LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    logits(model)  # a forward registers and removes the parametrizations
    delete_adapter(model, "default")
    assert list(model.model.layers[0].mlp.experts._parameters) == ["gate_up_proj", "down_proj"]
    assert list(model.state_dict()) == list(tiny_mixtral().state_dict())
