"""`--task regress`: a sequence classifier with one output fitting a number, its honest scores (beside
always answering the mean), and its adapter used by eval, predict, PEFT, export and the server."""

import csv
import json
import random

import numpy as np
import pytest
import torch

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.tasks import get_task
from lorakit.tasks.regress import scores
from tiny_training import save_tiny_classifier

WORDS = {"good": 1, "great": 1, "bad": -1, "awful": -1, "film": 0, "the": 0}


def _scored_texts(n: int, seed: int = 0) -> list[dict]:
    """Texts of a few words, each scored 5 + (good words) - (bad words): a number that follows from the text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(sorted(WORDS)) for _ in range(rng.randint(2, 8))]
        rows.append({"text": " ".join(words), "label": 5 + sum(WORDS[w] for w in words)})
    return rows


def _write(path, rows, label="label") -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["text", label])
        writer.writeheader()
        writer.writerows({"text": r["text"], label: r["label"]} for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT given one output and trained to the scores (LoRA on query and value, its head whole)."""
    root = tmp_path_factory.mktemp("regress")
    model = save_tiny_classifier(root / "cls")
    data = _write(root / "scores.csv", _scored_texts(300))
    out = root / "run"
    assert main(["train", "--task", "regress", "--model", str(model), "--data", data, "--steps", "60",
                 "--batch-size", "8", "--eval-every", "20", "--lr", "1e-2", "--out", str(out)]) == 0
    return {"model": str(model), "data": data, "out": out, "root": root,
            "report": json.loads((out / "report.json").read_text())}


def test_the_scores_are_scikit_learn_s_and_scipy_s_beside_the_mean():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    target = np.array([1.0, 2.0, 2.5, 4.0, 7.0])
    predicted = np.array([1.5, 1.8, 3.0, 3.5, 6.0])
    got = scores(target, predicted)
    assert got["rmse"] == pytest.approx(mean_squared_error(target, predicted) ** 0.5)
    assert got["mae"] == pytest.approx(mean_absolute_error(target, predicted))
    assert got["r2"] == pytest.approx(r2_score(target, predicted))
    assert got["pearson"] == pytest.approx(pearsonr(target, predicted)[0])
    assert got["spearman"] == pytest.approx(spearmanr(target, predicted)[0])
    assert got["mean_rmse"] == pytest.approx(target.std())  # always answering the mean: the labels' spread
    assert got["mean_mae"] == pytest.approx(np.abs(target - target.mean()).mean())
    constant = scores(target, np.full(5, target.mean()))
    assert constant["pearson"] is None and constant["r2"] == pytest.approx(0.0)
    task = get_task("regress")
    assert task.verdict(constant, "test").startswith(
        "warning: test RMSE 2.088 is no better than always answering the mean (2.088; R² 0.000)")
    assert task.verdict(got, "test") is None


def test_the_labels_must_be_numbers_that_differ():
    task = get_task("regress")
    rows = [{"text": f"t{i}", "label": label, "_where": f"f line {i}"} for i, label in enumerate(["1", "2.5", "-3e2"])]
    assert task.labels(rows, "f") is None
    with pytest.raises(LorakitError, match="has the label 'high', which is not a number; --task regress fits numbers"):
        task.labels([*rows, {"text": "x", "label": "high", "_where": "f line 9"}], "f")
    with pytest.raises(LorakitError, match="has only the value 2; a regression needs labels that differ"):
        task.labels([{"text": "a", "label": "2"}, {"text": "b", "label": "2.0"}], "f")


def test_numbers_are_read_as_written_not_merged_into_classes(tmp_path):
    import warnings

    from lorakit.data.labels import LabelWarning

    path = _write(tmp_path / "spelled.csv", [{"text": "a", "label": "5"}, {"text": "b", "label": "5.0"},
                                              {"text": "c", "label": "1"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the same number written differently is one class"
        records = get_task("regress").read_records(path)
    assert [r["label"] for r in records] == ["5", "5.0", "1"]
    with pytest.warns(LabelWarning, match="same number written differently"):
        get_task("classify").read_records(path)


def test_examples_carry_their_number_and_batches_hold_float32(trained):
    from transformers import AutoTokenizer

    from lorakit.data import collate

    task = get_task("regress")
    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    records = [{"text": "good film", "label": "6", "_where": "a"}, {"text": "bad", "label": "3.25", "_where": "b"}]
    examples = task.encode(records, tokenizer, 16, None).examples
    batch = collate(examples, 0)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [6.0, 3.25]
    with pytest.raises(LorakitError, match="b: the label 'lots' is not a number"):
        task.encode([records[0], {**records[1], "label": "lots"}], tokenizer, 16, None)


def test_the_loss_is_the_squared_error_and_the_head_starts_at_the_mean(trained):
    from lorakit.data import collate
    from lorakit.tasks import TaskData

    task = get_task("regress")
    model, tokenizer = task.load_model(trained["model"], None)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    records = [{"text": r["text"], "label": str(r["label"]), "_where": str(i)} for i, r in enumerate(_scored_texts(12))]
    examples = task.encode(records, tokenizer, 16, None).examples
    task.start(model, TaskData(examples, [], [], "s"))
    assert model.classifier.bias.item() == pytest.approx(np.mean([e.label for e in examples]))
    batch = collate(examples, tokenizer.pad_token_id)
    stats = task.batch_stats(model, batch)
    with torch.no_grad():
        answers = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert stats["loss_sum"].item() == pytest.approx(((answers - batch["labels"]) ** 2).sum().item(), rel=1e-5)
    assert stats["count"].item() == 12 and torch.equal(stats["target"], batch["labels"])


def test_a_run_learns_the_number_and_reports_it_beside_the_mean(trained):
    report = trained["report"]
    assert report["task"] == "regress" and report["metric"] == "rmse"
    before, after = report["validation_before"]["rmse"], report["validation_after"]["rmse"]
    assert after < 0.95 * before  # the head starts at the mean: before is about the labels' spread
    test = report["test"]
    assert test["r2"] > 0.05 and test["pearson"] > 0.5 and test["rmse"] < test["mean_rmse"]
    points = test["points"]  # the answers the figure draws: every test example here (at most 5,000)
    assert len(points["target"]) == len(points["predicted"]) == test["examples"]
    figure = trained["out"] / "predictions.png"
    assert report["scatter_path"] == str(figure) and figure.stat().st_size > 10_000
    assert not (trained["out"] / "confusion.png").exists()
    task_file = json.loads((trained["out"] / "adapter" / "lorakit_task.json").read_text())
    assert task_file["task"] == "regress" and task_file["labels"] is None


def test_eval_and_predict_give_numbers(trained, capsys, tmp_path):
    out = str(trained["out"])
    assert main(["eval", "--adapter", out]) == 0
    printed = capsys.readouterr().out
    assert "test RMSE" in printed and "always answering the mean" in printed and "Pearson r" in printed
    assert main(["predict", "--adapter", out, "good great film", "bad awful"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    values = [float(line.split()[0]) for line in lines[-2:]]
    assert values[0] > values[1]  # more good words, a higher number
    data = _write(tmp_path / "new.csv", _scored_texts(5, seed=9))
    assert main(["predict", "--adapter", out, "--data", data, "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and list(rows[0]) == ["text", "label", "prediction"]
    assert all(np.isfinite(float(row["prediction"])) for row in rows)


def test_a_folder_peft_wrote_with_a_one_output_head_is_taken_as_a_regression(trained, capsys, tmp_path):
    import shutil

    from lorakit.io import WEIGHTS_NAME
    from lorakit.peft_format import saved_head_outputs

    folder = tmp_path / "peft"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # no lorakit_task.json: as PEFT saves it
        shutil.copy(trained["out"] / "adapter" / name, folder / name)
    assert saved_head_outputs(folder / WEIGHTS_NAME) == 1
    assert main(["predict", "--adapter", str(folder), "--model", trained["model"], "good great film"]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split()[0]) > 0
    assert main(["eval", "--adapter", str(folder), "--model", trained["model"], "--data", trained["data"]]) == 0
    assert "data RMSE" in capsys.readouterr().out


def test_peft_loads_the_adapter_onto_a_one_output_model_and_export_merges_it(trained, tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.inference import load_trained, predict

    texts = ["good film", "the awful bad film", "great"]
    ours = load_trained([trained["out"]])
    expected = torch.tensor([row["value"] for row in predict(ours, texts)[ours.names[0]]])
    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(trained["model"], num_labels=1,
                                                              ignore_mismatched_sizes=True)
    theirs = peft.PeftModel.from_pretrained(base, trained["out"] / "adapter").eval()
    assert main(["export", "--adapter", str(trained["out"]), "--merged", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_labels == 1 and merged.config.problem_type == "regression"
    with torch.no_grad():
        for model in (theirs, merged):
            torch.testing.assert_close(model(**batch).logits[:, 0], expected, atol=1e-5, rtol=0)


def test_mistakes_are_one_line_and_exit_2(trained, tmp_path, capsys):
    base = ["train", "--task", "regress", "--model", trained["model"], "--steps", "1", "--batch-size", "8"]
    words = _write(tmp_path / "words.csv", [{"text": f"text {i}", "label": ["low", "high"][i % 2]} for i in range(40)])
    cases = {
        "--data " + words: "which is not a number; --task regress fits numbers",
        "--data " + trained["data"] + " --class-weights balanced": "--class-weights is for a task with classes",
        "--data " + trained["data"] + " --label-smoothing 0.1": "--label-smoothing is for a loss over classes",
    }
    for i, (extra, message) in enumerate(cases.items()):
        assert main([*base, *extra.split(), "--out", str(tmp_path / f"r{i}")]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("lorakit train: error: ") and message in error, error
