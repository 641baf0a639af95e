"""Adapter files: round trips, and every way a file can fail to fit (the model stays as it was)."""

import json
import os

import pytest
import torch

from lorakit import LoraConfig, LorakitError, attach, load_adapter, read_adapter, save_adapter, write_adapter
from lorakit.io import lora_factors
from lorakit.model import active_adapters, disable_adapters, lora_configs, lora_layers, set_active
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

Q0 = "model.layers.0.self_attn.q_proj"
KEY = "base_model.model." + Q0


def trained(model, config, name="default", seed=0):
    """``model`` with adapter ``name`` attached and every trainable tensor moved off its init."""
    attach(model, config, name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            lora_configs(model), active_adapters(model))


def assert_unchanged(model, before):
    state, modules, grads, configs, active = snapshot(model)
    assert modules == before[1] and grads == before[2] and configs == before[3] and active == before[4]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


@pytest.fixture
def saved(tmp_path):
    """A rank-4 q/v adapter of the tiny Llama saved to disk, and the model that made it."""
    model = trained(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


def refuse(folder, model=None, match=None):
    """Loading ``folder`` raises LorakitError (matching ``match``) and leaves the model as it was."""
    model = model if model is not None else tiny_llama()
    before = snapshot(model)
    with pytest.raises(LorakitError, match=match) as err:
        load_adapter(model, folder, "sql")
    assert_unchanged(model, before)
    return str(err.value)


def rewrite(folder, edit_tensors=None, edit_config=None):
    config, tensors = read_adapter(folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    write_adapter(folder, config, tensors)
    if edit_config:
        edit_config(raw)
    (folder / "adapter_config.json").write_text(json.dumps(raw))


# ------------------------------------------------------------------ round trips


def test_round_trip_gives_the_same_outputs_and_tensors(saved):
    model, folder = saved
    fresh = load_adapter(tiny_llama(), folder, "sql")
    x = token_batch()
    torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)
    config = lora_configs(fresh)["sql"]
    assert (config.r, config.alpha, config.target_modules) == (4, 8, ["q_proj", "v_proj"])
    layer = dict(lora_layers(fresh))[Q0]
    assert torch.equal(layer.adapters["sql"].B, dict(lora_layers(model))[Q0].adapters["default"].B)
    assert active_adapters(fresh) == ("sql",)


def test_files_are_peft_layout_and_no_temporary_file_is_left(saved):
    _, folder = saved
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 8
    _, tensors = read_adapter(folder)
    assert tensors[KEY + ".lora_A.weight"].shape == (4, 32)
    assert tensors[KEY + ".lora_B.weight"].shape == (32, 4)


def test_saving_again_replaces_the_files(saved):
    model, folder = saved
    with torch.no_grad():
        dict(lora_layers(model))[Q0].adapters["default"].B.zero_()
    save_adapter(model, folder)
    _, tensors = read_adapter(folder)
    assert not tensors[KEY + ".lora_B.weight"].any()


def test_several_adapters_load_side_by_side_and_activate_false_keeps_the_active_set(saved, tmp_path):
    model, folder = saved
    other = trained(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"]), seed=3)
    save_adapter(other, tmp_path / "other")
    fresh = load_adapter(tiny_llama(), folder, "sql")
    load_adapter(fresh, tmp_path / "other", "chat", activate=False)
    assert active_adapters(fresh) == ("sql",)
    x = token_batch()
    torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=1e-6, rtol=0)
    set_active(fresh, "chat")
    torch.testing.assert_close(fresh(x).logits, other(x).logits, atol=1e-6, rtol=0)


def test_gpt2_conv1d_with_saved_head_and_bias_round_trip(tmp_path):
    config = LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"], bias="lora_only")
    model = trained(tiny_gpt2(), config)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_gpt2(), tmp_path)
    x = token_batch()
    torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)


def test_loading_does_not_consume_the_random_stream(saved):
    _, folder = saved
    torch.manual_seed(123)
    load_adapter(tiny_llama(), folder)
    after = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama()
    assert torch.equal(torch.rand(3), after)


def test_a_pissa_adapter_loads_onto_the_original_base_as_peft_loads_it(tmp_path):
    model = trained(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init="pissa"))
    save_adapter(model, tmp_path, original_base=False)  # the factors as trained, for the residual base
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path, "p")
    layer, trained_layer = dict(lora_layers(fresh))[Q0], dict(lora_layers(model))[Q0]
    # loading runs the init on the original W, as PEFT does: W becomes the residual trained on
    torch.testing.assert_close(layer.weight, trained_layer.weight, atol=1e-6, rtol=0)
    assert torch.equal(layer.adapters["p"].A, trained_layer.adapters["default"].A)
    assert lora_configs(fresh)["p"].init == "pissa"


def test_read_and_write_adapter_without_a_model(saved, tmp_path):
    _, folder = saved
    config, tensors = read_adapter(folder)
    factors = lora_factors(tensors)
    assert set(factors) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    A, B = factors[Q0]
    assert A.shape == (4, 32) and B.shape == (32, 4)
    write_adapter(tmp_path / "copy", config.to_peft_dict(), {k: v * 2 for k, v in tensors.items()})
    config2, tensors2 = read_adapter(tmp_path / "copy")
    assert config2 == config
    assert torch.equal(tensors2[KEY + ".lora_B.weight"], 2 * tensors[KEY + ".lora_B.weight"])


def test_save_unknown_adapter_name_says_which_exist(saved, tmp_path):
    model, _ = saved
    with pytest.raises(LorakitError, match=r"no adapter 'sql'.*\['default'\]"):
        save_adapter(model, tmp_path / "x", "sql")


# ------------------------------------------------------------------ files that do not fit


def test_missing_factor_is_named_with_its_module_path(saved):
    _, folder = saved
    rewrite(folder, edit_tensors=lambda t: t.pop(KEY + ".lora_B.weight"))
    refuse(folder, match=f"missing lora_B for {Q0}")


def test_unexpected_key_is_named(saved):
    _, folder = saved

    def add(t):
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] = torch.zeros(16, 4)
        t["base_model.model.model.nowhere.weight"] = torch.zeros(2)

    rewrite(folder, edit_tensors=add)
    message = refuse(folder)
    assert "unexpected LoRA factors for model.layers.0.self_attn.k_proj: the config's target_modules" in message
    assert "unexpected key base_model.model.model.nowhere.weight" in message


def test_rank_mismatch_says_both_ranks(saved):
    _, folder = saved
    rewrite(folder, edit_config=lambda raw: raw.update(r=8))
    message = refuse(folder, match=f"adapter 'sql' has rank 8 but the file holds rank 4 for {Q0}")
    assert message.count("has rank 8 but the file holds rank 4") == 4  # every module listed


def test_every_problem_is_listed_at_once(saved):
    _, folder = saved

    def damage(t):
        t.pop(KEY + ".lora_A.weight")
        t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(17, 4)

    rewrite(folder, edit_tensors=damage)
    message = refuse(folder)
    assert f"missing lora_A for {Q0}" in message
    assert "model.layers.1.self_attn.v_proj: the file holds A (4, 32) and B (17, 4)" in message
    assert "needs A (4, 32) and B (16, 4)" in message


def test_a_classifier_adapter_of_its_own_labels_brings_its_own_head(tmp_path):
    """A classifier adapter trained for 3 classes, loaded onto a model whose head has 2 (one base
    serving adapters of different label sets): that adapter answers through its own 3-way head,
    exactly as on a 3-class model, and the base and other adapters keep the 2-way one."""
    made = trained(tiny_bert_classifier(num_labels=3), LoraConfig(r=2, target_modules=["query"],
                                                                  modules_to_save=["classifier"]))
    save_adapter(made, tmp_path / "three")
    two = tiny_bert_classifier(num_labels=2)
    x = token_batch()
    with torch.no_grad():
        base = two(input_ids=x).logits
        load_adapter(two, tmp_path / "three", "three")
        assert torch.allclose(two(input_ids=x).logits, made(input_ids=x).logits, atol=1e-6)
        with disable_adapters(two):
            assert torch.equal(two(input_ids=x).logits, base)
    other = trained(tiny_bert_classifier(num_labels=2), LoraConfig(r=2, target_modules=["value"],
                                                                   modules_to_save=["classifier"]), seed=1)
    save_adapter(other, tmp_path / "two")
    load_adapter(two, tmp_path / "two", "two")  # the head of 2 classes beside the one of 3
    set_active(two, "two")
    with torch.no_grad():
        assert torch.allclose(two(input_ids=x).logits, other(input_ids=x).logits, atol=1e-6)
    save_adapter(two, tmp_path / "again", "three")  # saved again with its own head's shape
    assert read_adapter(tmp_path / "again")[1]["base_model.model.classifier.weight"].shape == (3, 32)


def test_saved_module_shape_mismatch_is_listed(tmp_path):
    model = trained(tiny_bert_classifier(num_labels=3), LoraConfig(r=2, target_modules=["query"],
                                                                   modules_to_save=["classifier", "bert.pooler.dense"]))
    save_adapter(model, tmp_path)

    def widen(tensors):  # the pooler's rows are not classes: a misfit there is still refused
        key = "base_model.model.bert.pooler.dense.weight"
        tensors[key] = torch.zeros(33, 32)

    rewrite(tmp_path, edit_tensors=widen)
    refuse(tmp_path, tiny_bert_classifier(num_labels=2), match=r"bert.pooler.dense.weight: the file holds shape "
                                                              r"\(33, 32\), the model \(32, 32\)")


def test_a_grown_vocabulary_says_to_resize_the_embeddings_first(tmp_path):
    grown = tiny_llama()
    grown.resize_token_embeddings(136, mean_resizing=False)
    model = trained(grown, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    save_adapter(model, tmp_path)
    refuse(tmp_path, tiny_llama(), match=r"model.embed_tokens.weight: the file holds shape \(136, 32\), the model "
                                         r"\(128, 32\) \(the adapter was trained with a vocabulary of 136 tokens.*"
                                         r"model.resize_token_embeddings\(136\)")
    resized = tiny_llama()
    resized.resize_token_embeddings(136, mean_resizing=False)
    load_adapter(resized, tmp_path)  # what the message says works


def test_adapter_for_another_architecture(saved):
    _, folder = saved
    refuse(folder, tiny_bert_classifier(), match="was made for LlamaForCausalLM, not for BertForSequenceClassification")


def test_a_classifier_adapter_on_another_architecture_is_the_one_error_without_a_warning_first(tmp_path):
    import warnings

    from transformers import LlamaForSequenceClassification

    model = trained(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"]))
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "holds no weights for ['score']" before the misfit
        refuse(tmp_path, LlamaForSequenceClassification(tiny_llama().config).eval(),
               match="was made for BertForSequenceClassification, not for LlamaForSequenceClassification")


def test_peft_style_file_for_another_architecture(saved):
    _, folder = saved
    config, tensors = read_adapter(folder)
    write_adapter(folder, config.replace(target_modules=["query"]), tensors)  # no lorakit metadata, as PEFT's
    refuse(folder, tiny_bert_classifier(), match="another architecture: none of its 4 module paths")


def test_truncated_weights_file(saved):
    _, folder = saved
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refuse(folder, match="adapter_model.safetensors is truncated or corrupt")


def test_garbage_weights_file(saved):
    _, folder = saved
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 8 + b"not a safetensors file")
    refuse(folder, match="truncated or corrupt")


def test_config_that_does_not_parse(saved):
    _, folder = saved
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    refuse(folder, match="adapter_config.json does not parse as JSON")


def test_config_with_bad_value(saved):
    _, folder = saved
    rewrite(folder, edit_config=lambda raw: raw.update(r=0))
    refuse(folder, match="r must be a positive integer, got 0")


def test_missing_folder_and_files(saved, tmp_path):
    _, folder = saved
    refuse(tmp_path / "nope", match="does not exist")
    (folder / "adapter_model.safetensors").unlink()
    refuse(folder, match="holds no adapter_model.safetensors")
    (folder / "adapter_config.json").unlink()
    refuse(folder, match="holds no adapter_config.json")


def test_name_already_taken(saved):
    _, folder = saved
    model = load_adapter(tiny_llama(), folder, "sql")
    refuse(folder, model, match="already has an adapter 'sql'")


def test_unknown_config_keys_warn_and_still_load(saved):
    model, folder = saved
    rewrite(folder, edit_config=lambda raw: raw.update(shiny_future_option=3))
    with pytest.warns(UserWarning, match="shiny_future_option"):
        fresh = load_adapter(tiny_llama(), folder)
    x = token_batch()
    torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)


# ------------------------------------------------------------------ PEFT's old .bin format


def test_bin_adapter_of_plain_tensors_is_read_without_pickle_code(saved):
    model, folder = saved
    _, tensors = read_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    fresh = load_adapter(tiny_llama(), folder)
    x = token_batch()
    torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)


class Payload:
    """Unpickling this would call print: arbitrary code, which a loader must refuse."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_bin_adapter_with_pickled_objects_is_refused(saved, capsys):
    _, folder = saved
    _, tensors = read_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "extra": Payload()}, folder / "adapter_model.bin")
    refuse(folder, match="refusing .*adapter_model.bin.*arbitrary code")
    assert "pickled code ran" not in capsys.readouterr().out
