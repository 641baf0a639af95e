"""Amplification factor of ΔW against W (LoRA §7.3, Table 7) on constructed matrices."""

import pytest
import torch

from lorakit.analysis import amplification
from lorakit.errors import LorakitError


def _weight(out=48, inp=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, inp, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    S = torch.logspace(1, -1, inp, dtype=torch.float64)  # σ from 10 down to 0.1
    return U, S, V, (U * S) @ V.T


def test_delta_inside_w_top_directions_has_factor_one():
    U, S, V, W = _weight()
    r = 4
    delta = (U[:, :r] * S[:r]) @ V[:, :r].T  # W's own top-r part
    a = amplification(delta, W, r)
    assert a.factor == pytest.approx(1.0, rel=1e-9)
    assert a.along_delta == pytest.approx(a.along_weight, rel=1e-9)
    assert a.along_weight == pytest.approx(float(S[:r].square().sum().sqrt()))
    assert a.weight_norm == pytest.approx(float(S.square().sum().sqrt()))


def test_delta_in_weak_directions_is_amplified():
    U, S, V, W = _weight()
    r = 4
    # ΔW with W's top norm but along W's weakest directions: ‖UᵀWV‖ = sqrt(Σ of the smallest σ²).
    delta = (U[:, -r:] * S[:r]) @ V[:, -r:].T
    a = amplification(delta, W, r)
    expected = float(S[:r].square().sum().sqrt() / S[-r:].square().sum().sqrt())
    assert a.factor == pytest.approx(expected, rel=1e-9)
    assert a.factor > 50
    assert a.along_delta < a.along_random < a.along_weight


def test_scaling_delta_scales_the_factor():
    U, S, V, W = _weight(seed=1)
    delta = (U[:, :2] * S[:2]) @ V[:, :2].T
    assert amplification(3.0 * delta, W, 2).factor == pytest.approx(3.0)


def test_random_baseline_is_seeded_and_near_its_expectation():
    _, _, _, W = _weight(out=200, inp=150, seed=2)
    delta = torch.randn(200, 150, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a1 = amplification(delta, W, 8, seed=5)
    assert a1.along_random == amplification(delta, W, 8, seed=5).along_random
    # E‖UᵀWV‖² = r²‖W‖²/(out·in) for random orthonormal U (out, r), V (in, r)
    expected = 8 * a1.weight_norm / (200 * 150) ** 0.5
    assert a1.expected_random == pytest.approx(expected)
    assert 0.4 * expected < a1.along_random < 2.5 * expected


def test_bad_inputs_name_the_value():
    with pytest.raises(LorakitError, match=r"\(4, 5\) but W is \(5, 4\)"):
        amplification(torch.zeros(4, 5), torch.zeros(5, 4), 1)
    with pytest.raises(LorakitError, match="r 9 is out of range"):
        amplification(torch.ones(4, 5), torch.ones(4, 5), 9)


@pytest.mark.parametrize("make", ["mixtral", "gpt_oss"])
def test_lora_on_expert_parameters_gives_a_row_per_expert_as_peft_merges_it(tmp_path, make):
    """Each expert's ΔW, read from PEFT's own merge (GPT-OSS's stacks stored (E, in, out))."""
    peft = pytest.importorskip("peft")
    from lorakit.analysis import adapter_amplification
    from tiny_models import tiny_gpt_oss, tiny_mixtral

    build = {"mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}[make]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                          target_parameters=["experts.gate_up_proj"]))
    theirs.save_pretrained(tmp_path)
    base = build()
    merged = theirs.merge_and_unload()
    rows = adapter_amplification(str(tmp_path), base)
    experts = [path for path in rows if "[" in path]
    layers = len(base.model.layers)
    assert len(experts) == 3 * layers and len(rows) == 4 * layers  # q_proj, and 3 experts in each block
    for i in range(layers):
        W = base.model.layers[i].mlp.experts.gate_up_proj.detach()
        delta = merged.model.layers[i].mlp.experts.gate_up_proj.detach() - W
        if make == "gpt_oss":
            W, delta = W.transpose(1, 2), delta.transpose(1, 2)
        for e in range(3):
            want = amplification(delta[e], W[e], 2)
            got = rows[f"model.layers.{i}.mlp.experts.gate_up_proj[{e}]"]
            assert got.factor == pytest.approx(want.factor, rel=1e-4) and got.shape == want.shape
