"""`lorakit export --merged`: a plain transformers folder whose logits equal the adapter on its
full-precision base, whatever base the adapter was trained on."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, attach, save_adapter
from lorakit.cli import main
from lorakit.quantize import quantize_base
from tiny_training import save_tiny_llama

IDS = torch.tensor([[5, 17, 40, 3, 99, 12, 7, 60], [8, 8, 31, 2, 70, 44, 1, 9]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base") / "llm")


def adapter_on(base_folder, out, quantize=None, seed=3):
    """A random-valued all-linear adapter saved to ``out``; returns the logits it gives on the
    full-precision base."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    if quantize:
        quantize_base(model, quantize)
    torch.manual_seed(seed)
    attach(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"))
    save_adapter(model, out)
    from lorakit import load_adapter

    with torch.no_grad():
        return load_adapter(reference, out)(IDS).logits


def exported_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def assert_relative(got, want, tol=1e-4):
    assert float((got - want).abs().max() / want.abs().max()) <= tol


def test_export_writes_a_plain_folder_whose_logits_equal_the_adapter(base, tmp_path, capsys):
    want = adapter_on(base, tmp_path / "ad")
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--merged", str(tmp_path / "out"),
                 "--dtype", "fp32"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any("adapters" in k or "lora" in k for k in keys)
    assert_relative(exported_logits(out), want)


def test_an_adapter_trained_on_nf4_is_merged_into_the_full_precision_base(base, tmp_path):
    want = adapter_on(base, tmp_path / "ad", quantize="nf4")  # the adapter on the full-precision base
    main(["export", "--adapter", str(tmp_path / "ad"), "--merged", str(tmp_path / "out"), "--model", str(base)])
    assert_relative(exported_logits(tmp_path / "out"), want)


def test_dtype_defaults_to_the_bases_own(base, tmp_path):
    bf16_base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(base).save_pretrained(bf16_base)
    adapter_on(bf16_base, tmp_path / "ad")
    main(["export", "--adapter", str(tmp_path / "ad"), "--merged", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {torch.bfloat16}


def test_a_folder_written_by_lorakit_train_exports_without_naming_its_base(base, tmp_path):
    from lorakit.inference import load_trained
    from lorakit.train import TrainConfig, train
    from tiny_training import chat_records, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    train(TrainConfig(task="chat", model=str(base), data=str(data), steps=2, batch_size=8, targets="all-linear",
                      bf16=False, out=str(tmp_path / "run"), progress=False, quantize="int8"))
    adapter = tmp_path / "run" / "adapter"
    with torch.no_grad():
        want = load_trained([adapter]).model(IDS).logits
    assert main(["export", "--adapter", str(adapter), "--merged", str(tmp_path / "out")]) == 0
    assert_relative(exported_logits(tmp_path / "out"), want)


def test_an_occupied_output_folder_is_refused(base, tmp_path, capsys):
    adapter_on(base, tmp_path / "ad")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--merged", str(tmp_path / "out")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
