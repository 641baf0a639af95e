"""lorakit.targets, the one authority on a model's structure: dense leaves, heads, kinds, fingerprints."""

import pytest
import torch
from torch import nn
from transformers import BertModel, DistilBertConfig, DistilBertForSequenceClassification
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, LorakitError, attach, lora_layers
from lorakit.targets import (
    BARE, CAUSAL_LM, CLASSIFIER, OTHER, adaptable_parameters, architecture_kind, is_conv1d, linear_leaves,
    model_fingerprint, model_kind, output_heads, task_heads, transformer_blocks, weight_out_in,
)
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_gpt_oss, tiny_llama, tiny_mixtral


def tiny_bert() -> BertModel:
    return BertModel(tiny_bert_classifier().config).eval()


def tiny_distilbert() -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=1, n_heads=4, max_position_embeddings=64)
    return DistilBertForSequenceClassification(config).eval()


def test_model_kinds_have_one_answer():
    assert model_kind(tiny_bert()) == BARE
    assert model_kind(tiny_bert_classifier()) == CLASSIFIER
    assert model_kind(tiny_llama()) == CAUSAL_LM
    assert model_kind(tiny_gpt2()) == CAUSAL_LM  # GPT2LMHeadModel: named neither ...Model nor ...ForCausalLM
    assert model_kind(nn.Sequential(nn.Linear(2, 2))) == OTHER
    assert architecture_kind("BertForMaskedLM") == OTHER
    assert architecture_kind("MyRemoteCodeForSequenceClassification") == CLASSIFIER
    assert architecture_kind(None) == OTHER


def test_conv1d_is_detected_in_one_place_and_read_as_out_in():
    conv, linear = Conv1D(6, 4), nn.Linear(4, 6)  # both map 4 features to 6
    assert is_conv1d(conv) and not is_conv1d(linear)
    assert weight_out_in(conv).shape == weight_out_in(linear).shape == (6, 4)
    assert weight_out_in(conv).data_ptr() == conv.weight.data_ptr()  # a view, not a copy


def test_heads_are_the_output_embeddings_and_named_task_heads():
    assert output_heads(tiny_llama()) == ["lm_head"]
    assert output_heads(tiny_bert_classifier()) == ["classifier"]
    assert output_heads(tiny_bert()) == []
    assert task_heads(tiny_bert_classifier()) == ["classifier"]
    assert task_heads(tiny_distilbert()) == ["pre_classifier", "classifier"]


def test_linear_leaves_leave_heads_out_and_see_through_lora_layers():
    model = tiny_gpt2()
    leaves = linear_leaves(model)
    assert "lm_head" not in leaves and len(leaves) == 8 and all(is_conv1d(m) for m in leaves.values())
    assert "lm_head" in linear_leaves(model, heads=True)
    attach(model, LoraConfig(r=2, target_modules=["c_attn"]))
    after = linear_leaves(model)
    assert list(after) == list(leaves) and all(after[p] is leaves[p] for p in leaves)  # the wrapped base layers


def test_fingerprint_is_architecture_and_shapes_not_values():
    assert model_fingerprint(tiny_llama(0)) == model_fingerprint(tiny_llama(1))
    assert model_fingerprint(tiny_llama()) != model_fingerprint(tiny_gpt2())
    assert model_fingerprint(tiny_bert_classifier(num_labels=2)) != model_fingerprint(tiny_bert_classifier(num_labels=3))
    model = tiny_bert_classifier()
    before = model_fingerprint(model)
    attach(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert model_fingerprint(model) == before
    assert before.startswith("BertForSequenceClassification:")


@pytest.mark.parametrize("saved, expected", [(["classifier"], ["pre_classifier", "classifier"]), (["pre_classifier"], ["pre_classifier"])])
def test_modules_to_save_match_as_peft_matches_them(saved, expected):
    """PEFT saves every module whose path ends in a name, with no dot boundary."""
    from lorakit.targets import saved_paths

    assert saved_paths(tiny_distilbert(), LoraConfig(modules_to_save=saved, target_modules=["q_lin"])) == expected


def test_transformer_blocks_are_the_repeated_layers_of_the_body():
    assert list(transformer_blocks(tiny_llama())) == ["model.layers.0", "model.layers.1"]
    assert list(transformer_blocks(tiny_gpt2())) == ["transformer.h.0", "transformer.h.1"]
    bert = tiny_bert_classifier()  # _no_split_modules names BertEmbeddings too, which is no repeated block
    assert list(transformer_blocks(bert)) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    attach(bert, LoraConfig(target_modules=["query", "value"]))  # adapters inside change nothing
    assert all(type(b).__name__ == "BertLayer" for b in transformer_blocks(bert).values())
    # a plain torch model: the largest list of one module type
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32), num_layers=3)
    plain = nn.Sequential(nn.Embedding(10, 16), encoder, nn.ModuleList([nn.Linear(16, 2)]))
    assert list(transformer_blocks(plain)) == ["1.layers.0", "1.layers.1", "1.layers.2"]
    assert transformer_blocks(nn.Sequential(nn.Linear(2, 2))) == {}


def test_default_targets_are_peft_s_for_every_family_both_name():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    from lorakit.targets import DEFAULT_TARGETS

    shared = set(DEFAULT_TARGETS) & set(peft_defaults)
    assert {"llama", "qwen3", "bert", "deberta-v2", "gpt2", "phi", "mixtral"} <= shared
    assert {family: DEFAULT_TARGETS[family] for family in shared} == {family: peft_defaults[family] for family in shared}


def test_a_deberta_v2_classifier_gets_query_and_value_by_default():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from lorakit.targets import lora_layers

    model = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=2))
    attach(model, LoraConfig(r=2))
    adapted = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)})
    assert adapted == ["query_proj", "value_proj"]


def test_a_family_without_a_default_takes_the_first_known_names_it_has():
    from transformers import BigBirdConfig, BigBirdForSequenceClassification

    from lorakit.errors import LorakitError
    from lorakit.targets import DEFAULT_TARGETS, default_targets, lora_layers, walk

    model = BigBirdForSequenceClassification(BigBirdConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_labels=2, attention_type="original_full"))
    assert "big_bird" not in DEFAULT_TARGETS
    attach(model, LoraConfig(r=2))
    assert sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)}) == ["query", "value"]
    assert len(list(lora_layers(model))) == 4

    class Decoder(nn.Module):  # a custom model with the usual decoder names: q_proj/v_proj, not query/value
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.value = (nn.Linear(8, 8) for _ in range(4))

    assert default_targets("my-decoder", walk(Decoder())) == ["q_proj", "v_proj"]
    assert default_targets("bert", walk(Decoder())) == ["query", "value"]  # a family's own default comes first
    with pytest.raises(LorakitError, match="no default for model type None"):
        attach(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2))


def test_the_parameters_lora_on_parameters_is_for_are_experts_and_routers_only():
    """Fused expert stacks and routers' matrices; no dense layer's, embedding's or norm's weight, no bias."""
    assert adaptable_parameters(tiny_llama()) == [] and adaptable_parameters(tiny_gpt2()) == []
    assert adaptable_parameters(tiny_bert_classifier()) == []
    assert adaptable_parameters(tiny_mixtral()) == [(f"model.layers.{i}.mlp.{m}", p) for i in (0, 1) for m, p in
                                                   (("gate", "weight"), ("experts", "gate_up_proj"),
                                                    ("experts", "down_proj"))]
    adapted = attach(tiny_mixtral(), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["gate.weight"]))
    assert adaptable_parameters(adapted) == adaptable_parameters(tiny_mixtral())  # not lorakit's own layers' tensors
    found = adaptable_parameters(tiny_gpt_oss())  # GPT-OSS's experts carry bias stacks too: left out
    assert [name for _, name in found] == ["weight", "gate_up_proj", "down_proj"]
    # a parameter named as a module: the message says where it goes
    with pytest.raises(LorakitError, match=r"parameters \(--target-parameters\): gate.weight \(×2\), "
                                           r"experts.gate_up_proj \(×2\), experts.down_proj \(×2\)"):
        attach(tiny_mixtral(), LoraConfig(target_modules=["experts.gate_up_proj"]))


def test_a_module_named_outright_that_lorakit_cannot_wrap_is_refused_not_left_out():
    """PEFT refuses a named target it cannot adapt; lorakit took the others and dropped it in silence."""

    class Block(nn.Module):  # a ConvNeXt block's shape: depthwise convolution, norm, pointwise layer
        def __init__(self):
            super().__init__()
            self.dwconv, self.norm = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.LayerNorm(4)
            self.pwconv = nn.Linear(4, 8)

        def forward(self, x):
            return self.pwconv(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    refusal = r"cannot target blocks\.0\.dwconv, a Conv2d with groups=4 \(1 more like it\)"
    with pytest.raises(LorakitError, match=refusal):
        attach(Net(), LoraConfig(r=2, target_modules=["dwconv", "pwconv"]))
    with pytest.raises(LorakitError, match=r"cannot target blocks\.0\.norm, a LayerNorm .*groups=1; leave it out"):
        attach(Net(), LoraConfig(r=2, target_modules=["pwconv", "norm"]))
    for config in (LoraConfig(r=2, target_modules=["pwconv"]),
                   LoraConfig(r=2, target_modules=["dwconv", "pwconv"], exclude_modules=["dwconv"]),
                   LoraConfig(r=2, target_modules=r".*conv")):  # a pattern takes what it can, as "all-linear" does
        model = attach(Net(), config)
        assert sorted(p for p, _ in lora_layers(model)) == ["blocks.0.pwconv", "blocks.1.pwconv"]
