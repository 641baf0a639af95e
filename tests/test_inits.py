"""Inits that rewrite W start exactly as PEFT's do (olora, pissa), and keep the model's output."""

import pytest
import torch

from lorakit import LoraConfig, attach, lora_layers
from lorakit.inits import INITS, REWRITES_WEIGHT, initial_factors
from tiny_models import tiny_llama, token_batch

peft = pytest.importorskip("peft")


def test_registry_says_which_inits_rewrite_w():
    assert REWRITES_WEIGHT == {"olora", "pissa"} and REWRITES_WEIGHT <= set(INITS)
    config = LoraConfig(init="olora")
    assert config.to_peft_dict()["init_lora_weights"] == "olora"  # PEFT's name for it
    assert LoraConfig.from_peft_dict(config.to_peft_dict()).init == "olora"


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_init_equals_peft(init):
    targets = ["q_proj", "v_proj", "gate_proj"]
    ours = attach(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=targets, init=init))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights=init))
    modules = dict(theirs.base_model.model.named_modules())
    for path, layer in lora_layers(ours):
        peft_layer = modules[path]
        ad = layer.adapters["default"]
        A, B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-5)  # residual
        torch.testing.assert_close(ad.B @ ad.A, B @ A, rtol=1e-5, atol=1e-5)
        if init == "olora":  # QR is unique here (R's diagonal sign fixed by LAPACK): the factors themselves
            torch.testing.assert_close(ad.A, A, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ad.B, B, rtol=1e-5, atol=1e-5)
        A0, B0 = initial_factors(ad)
        assert torch.equal(A0, ad.A) and torch.equal(B0, ad.B)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, tiny_llama()(x).logits, rtol=1e-4, atol=1e-4)


def test_olora_with_a_rank_above_the_matrix_rank_pads_with_zeros():
    model = attach(torch.nn.Sequential(torch.nn.Linear(3, 5)), LoraConfig(r=4, alpha=4, target_modules=["0"],
                                                                          init="olora"))
    ad = model[0].adapters["default"]
    assert torch.count_nonzero(ad.A[3:]) == 0 and torch.count_nonzero(ad.B[:, 3:]) == 0
    torch.testing.assert_close(model[0].weight, torch.zeros(5, 3), rtol=0, atol=1e-6)  # W fully in B·A
