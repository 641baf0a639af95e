"""Adapter files travel both ways between lorakit and the real ``peft`` package.

Every adapter is perturbed before saving (B non-zero, trained heads and biases moved),
so equal logits mean the factors, their scaling and their placement all agree.
"""

import copy

import pytest
import torch

from lorakit import LoraConfig, attach, load_adapter, save_adapter
from lorakit.io import read_adapter
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

TOL = 1e-5


def perturb_trainable(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> int:
    """Move every trainable parameter off its init; returns how many were moved."""
    generator = torch.Generator().manual_seed(seed)
    moved = 0
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * std)
                moved += 1
    assert moved, "nothing to perturb: the test would prove nothing"
    return moved


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits if isinstance(inputs, dict) else model(inputs).logits


def peft_to_lorakit(make_base, peft_config, inputs, tmp_path):
    """Save a perturbed PEFT adapter; load it into lorakit; return both logits and the base's."""
    base_logits = logits(make_base(), inputs)
    peft_model = peft.get_peft_model(make_base(), peft_config)
    perturb_trainable(peft_model)
    peft_model.eval()
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(make_base(), tmp_path).eval()
    return expected, logits(ours, inputs), base_logits


def lorakit_to_peft(make_base, config, inputs, tmp_path):
    """Save a perturbed lorakit adapter; load it with PeftModel.from_pretrained."""
    base_logits = logits(make_base(), inputs)
    ours = attach(make_base(), config)
    perturb_trainable(ours)
    expected = logits(ours.eval(), inputs)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_base(), tmp_path).eval()
    return expected, logits(theirs, inputs), base_logits


def assert_same(expected, got, base):
    assert (expected - base).abs().max() > 1e-3, "the adapter does not change the output: test is void"
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


# ------------------------------------------------------------------ the embedded MiniLM


@pytest.fixture(scope="module")
def minilm():
    from lorakit.models import load_classifier

    torch.manual_seed(0)
    model, tokenizer = load_classifier("default", num_labels=2)
    inputs = dict(tokenizer(["a gripping, funny and humane film", "flat, dull and far too long"],
                            padding=True, return_tensors="pt"))
    return model, inputs


@pytest.mark.slow
def test_minilm_peft_adapter_loads_into_lorakit(minilm, tmp_path):
    model, inputs = minilm
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                          task_type="SEQ_CLS")
    assert_same(*peft_to_lorakit(lambda: copy.deepcopy(model), cfg, inputs, tmp_path))


@pytest.mark.slow
def test_minilm_lorakit_adapter_loads_into_peft(minilm, tmp_path):
    model, inputs = minilm
    cfg = LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"], init="random")
    assert_same(*lorakit_to_peft(lambda: copy.deepcopy(model), cfg, inputs, tmp_path))


# ------------------------------------------------------------------ tiny Llama: embeddings, patterns, rsLoRA


def test_llama_peft_adapter_with_embedding_patterns_and_rslora_loads_into_lorakit(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}, use_rslora=True,
                          task_type="CAUSAL_LM")
    with pytest.warns(UserWarning):  # PEFT: "Setting save_embedding_layers to True ..."
        expected, got, base = peft_to_lorakit(tiny_llama, cfg, token_batch(), tmp_path)
    assert_same(expected, got, base)
    config, tensors = read_adapter(tmp_path)
    assert config.use_rslora and config.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (2, 32)


def test_llama_lorakit_adapter_with_embedding_patterns_and_rslora_loads_into_peft(tmp_path):
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"q_proj": 32}, use_rslora=True, init="random")
    assert_same(*lorakit_to_peft(tiny_llama, cfg, token_batch(), tmp_path))


def test_llama_all_linear_written_explicitly_loads_into_peft(tmp_path):
    cfg = LoraConfig(r=4, alpha=4, target_modules="all-linear", init="random")
    assert_same(*lorakit_to_peft(tiny_llama, cfg, token_batch(), tmp_path))
    config, tensors = read_adapter(tmp_path)
    assert config.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not any("lm_head" in key for key in tensors)


# ------------------------------------------------------------------ tiny GPT-2: Conv1D, fan_in_fan_out


def test_gpt2_conv1d_peft_adapter_loads_into_lorakit(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          task_type="CAUSAL_LM")
    assert_same(*peft_to_lorakit(tiny_gpt2, cfg, token_batch(), tmp_path))


def test_gpt2_conv1d_lorakit_adapter_loads_into_peft(tmp_path):
    cfg = LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init="random")
    assert_same(*lorakit_to_peft(tiny_gpt2, cfg, token_batch(), tmp_path))


# ------------------------------------------------------------------ biases and heads (tiny BERT)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bert_peft_adapter_with_trained_biases_and_head_loads_into_lorakit(tmp_path, bias):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias,
                          modules_to_save=["classifier"], task_type="SEQ_CLS")
    assert_same(*peft_to_lorakit(tiny_bert_classifier, cfg, token_batch(), tmp_path))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bert_lorakit_adapter_with_trained_biases_and_head_loads_into_peft(tmp_path, bias):
    cfg = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], bias=bias, modules_to_save=["classifier"],
                     init="random")
    assert_same(*lorakit_to_peft(tiny_bert_classifier, cfg, token_batch(), tmp_path))


def test_lorakit_writes_the_keys_peft_writes(tmp_path):
    """Same folder content key for key and shape, for one config made both ways."""
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    save_adapter(attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), tmp_path / "ours")
    _, theirs = read_adapter(tmp_path / "peft")
    _, ours = read_adapter(tmp_path / "ours")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
