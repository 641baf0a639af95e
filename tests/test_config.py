"""LoraConfig: validation, PEFT-style name matching, per-path rank/alpha/scaling, PEFT dicts."""

import math
import warnings

import pytest

from lorakit.config import LoraConfig, name_matches, parse_targets
from lorakit.errors import LorakitError


@pytest.mark.parametrize("kw, needle", [
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": -3}, "got -3"),
    ({"r": 2.5}, "got 2.5"),
    ({"r": True}, "got True"),
    ({"alpha": 0}, "alpha must be a positive number, got 0"),
    ({"alpha": -1.5}, "got -1.5"),
    ({"alpha": float("nan")}, "got nan"),
    ({"dropout": 1.0}, "dropout must be a number in [0, 1), got 1.0"),
    ({"dropout": -0.1}, "got -0.1"),
    ({"init": "xavier"}, "init 'xavier' is unknown"),
    ({"bias": "some"}, "bias 'some' is unknown"),
    ({"target_modules": "(unclosed"}, "not a valid regular expression"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"),
    ({"alpha_pattern": {"q_proj": -2}}, "alpha_pattern['q_proj']"),
    ({"target_modules": ["q", ""]}, "non-empty module names"),
])
def test_invalid_values_name_the_value(kw, needle):
    with pytest.raises(LorakitError) as err:
        LoraConfig(**kw)
    assert needle in str(err.value)


def test_defaults_and_scaling():
    c = LoraConfig()
    assert (c.r, c.alpha, c.dropout, c.init, c.bias) == (8, 8, 0.0, "gaussian", "none")
    assert c.scaling_for("any.path") == 1.0
    assert LoraConfig(r=16, alpha=32).scaling_for("x") == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scaling_for("x") == pytest.approx(32 / 4)


def test_name_matching_like_peft():
    path = "model.layers.0.self_attn.q_proj"
    assert name_matches(["q_proj"], path)
    assert name_matches(["self_attn.q_proj"], path)
    assert name_matches([path], path)
    assert not name_matches(["proj"], path)  # a suffix must start at a dot
    assert not name_matches(["_proj"], path)
    assert name_matches(r".*\.(q|v)_proj", path)
    assert not name_matches(r"q_proj", path)  # a regex must match the whole path
    c = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.q_proj"])
    assert c.targets("model.layers.0.self_attn.q_proj")
    assert not c.targets("model.layers.1.self_attn.q_proj")
    assert not c.targets("model.layers.1.self_attn.k_proj")


@pytest.mark.parametrize("text, expected", [
    ("query,value", ["query", "value"]),
    (" query , value ,", ["query", "value"]),
    ("attention.self.query", ["attention.self.query"]),  # dots alone do not make a regex
    ("all-linear", "all-linear"),
    (None, None),
    (["query"], ["query"]),
    ("query|value", r"(?:.*\.)?(?:query|value)"),
    (r"layer\.[01]\..*query", r"(?:.*\.)?(?:layer\.[01]\..*query)"),
])
def test_target_strings_have_one_rule(text, expected):
    assert parse_targets(text) == expected
    assert parse_targets(parse_targets(text)) == expected  # parsing again changes nothing


def test_a_target_regex_matches_a_name_or_a_path_as_peft_reads_the_string():
    spec = parse_targets("query|value")
    assert LoraConfig(target_modules=spec).targets("bert.encoder.layer.0.attention.self.query")
    assert LoraConfig(target_modules=spec).targets("value")
    assert not LoraConfig(target_modules=spec).targets("bert.encoder.layer.0.attention.self.key")
    assert not LoraConfig(target_modules=spec).targets("bert.encoder.layer.0.attention.self.subquery")
    with pytest.raises(LorakitError, match=r"targets 'query\|\(' is not a valid regular expression"):
        parse_targets("query|(")
    with pytest.raises(LorakitError, match="names no module"):
        parse_targets(" , ")


def test_rank_and_alpha_patterns():
    c = LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},
                   alpha_pattern={"q_proj": 4})
    assert c.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert c.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert c.rank_for("model.layers.0.self_attn.xv_proj") == 8  # dot boundary
    assert c.alpha_for("model.layers.0.self_attn.q_proj") == 4
    assert c.scaling_for("model.layers.1.self_attn.q_proj") == 4 / 2
    assert c.scaling_for("model.layers.0.self_attn.v_proj") == 16 / 4
    rs = c.replace(use_rslora=True)
    assert rs.scaling_for("model.layers.0.self_attn.v_proj") == pytest.approx(16 / math.sqrt(4))


def test_peft_dict_round_trip():
    c = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], init="kaiming",
                   rank_pattern={"v_proj": 2}, bias="lora_only", modules_to_save=["score"], task_type="CAUSAL_LM")
    d = c.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["lora_alpha"] == 8 and d["lora_dropout"] == 0.1
    assert d["init_lora_weights"] is True
    assert LoraConfig.from_peft_dict(d) == c
    for init, peft_value in [("gaussian", "gaussian"), ("pissa", "pissa"), ("random", False)]:
        assert LoraConfig(init=init).to_peft_dict()["init_lora_weights"] == peft_value
        assert LoraConfig.from_peft_dict(LoraConfig(init=init).to_peft_dict()).init == init


def test_reads_real_peft_config_and_peft_reads_ours():
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="gaussian",
                             use_rslora=True).to_dict()
    theirs["peft_type"] = "LORA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of PEFT 0.21 is known
        c = LoraConfig.from_peft_dict(theirs)
    assert (c.r, c.alpha, c.use_rslora, c.init, sorted(c.target_modules)) == (4, 16, True, "gaussian", ["query", "value"])
    ours = LoraConfig(r=2, alpha=4, target_modules=["q"], rank_pattern={"q": 1}).to_peft_dict()
    back = peft.LoraConfig(**{k: v for k, v in ours.items() if k != "peft_type"})
    assert (back.r, back.lora_alpha, back.rank_pattern) == (2, 4, {"q": 1})


def test_unknown_keys_warn_and_unsupported_features_raise():
    d = LoraConfig().to_peft_dict()
    d["brand_new_option"] = 3
    with pytest.warns(UserWarning, match="brand_new_option"):
        LoraConfig.from_peft_dict(d)
    for key, value in (("layer_replication", [[0, 1]]), ("use_qalora", True)):
        with pytest.raises(LorakitError, match=f"sets {key}=.*a PEFT feature lorakit does not support"):
            LoraConfig.from_peft_dict({**LoraConfig().to_peft_dict(), key: value})
    with pytest.raises(LorakitError, match="IA3"):
        LoraConfig.from_peft_dict({"peft_type": "IA3"})
    tokens = LoraConfig.from_peft_dict({**LoraConfig().to_peft_dict(), "trainable_token_indices": {"wte": [3, 1]}})
    assert tokens.trainable_token_indices == {"wte": [3, 1]}
    assert tokens.to_peft_dict()["trainable_token_indices"] == {"wte": [3, 1]}
    for bad in ([1, 1], [-1], ["a"], {"": [1]}, {"wte": []}, 3):
        with pytest.raises(LorakitError, match="trainable_token_indices"):
            LoraConfig(trainable_token_indices=bad)
    biased = LoraConfig.from_peft_dict({**LoraConfig(init="kaiming").to_peft_dict(), "lora_bias": True})
    assert biased.lora_bias and biased.to_peft_dict()["lora_bias"] is True
