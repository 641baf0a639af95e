"""`lorakit predict`: texts in batches by length (each as alone), the records of a file (--data) written with
their predictions (--out), and what it refuses before a model loads."""

import csv
import json

import pytest
import torch

from lorakit.cli import main
from lorakit.inference import load_trained, predict
from tiny_training import save_tiny_classifier, write_jsonl

WORDS = ["good", "bad", "great", "awful", "fine", "dull"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A classifier trained on a file whose text column is named ``review``, with three classes."""
    root = tmp_path_factory.mktemp("predict")
    model = save_tiny_classifier(root / "cls", num_labels=3)
    records = [{"review": f"{WORDS[i % 6]} film number {i}" + " long" * (i % 7), "stars": f"s{i % 3}"}
               for i in range(90)]
    data = write_jsonl(root / "reviews.jsonl", records)
    out = root / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--text-column", "review", "--label-column",
                 "stars", "--steps", "3", "--batch-size", "8", "--max-length", "32", "--out", str(out)]) == 0
    return out


def test_texts_in_batches_by_length_are_predicted_each_as_alone(run):
    trained = load_trained([run])
    texts = [f"{WORDS[i % 6]} film" + " very" * (11 - i) for i in range(12)]  # twelve lengths, longest first
    (batched,) = predict(trained, texts, batch_size=5).values()
    assert [row["text"] for row in batched] == texts
    for text, row in zip(texts, batched):
        (alone,) = predict(trained, [text]).values()
        assert alone[0]["label"] == row["label"]
        assert list(alone[0]["probabilities"].values()) == pytest.approx(list(row["probabilities"].values()),
                                                                         abs=1e-6)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    ids = trained.tokenizer(texts[:1], truncation=True, max_length=trained.max_length(trained.names[0]),
                            return_tensors="pt")
    with torch.no_grad():
        expected = trained.model(**ids).logits.softmax(-1)[0]
    assert list(batched[0]["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-6)


def test_data_rows_are_written_with_their_predictions(run, tmp_path, capsys):
    rows = [{"id": str(i), "review": f"{WORDS[i % 6]} film" + " so" * i, "note": "x" * i} for i in range(9)]
    with open(tmp_path / "new.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "review", "note"])
        writer.writeheader()
        writer.writerows(rows)
    (alone,) = predict(load_trained([run]), [r["review"] for r in rows]).values()
    # the column the run trained on (review) is read without --text-column; the rows keep their order
    assert main(["predict", "--adapter", str(run), "--data", str(tmp_path / "new.csv"), "--out",
                 str(tmp_path / "out.csv"), "--batch-size", "4"]) == 0
    assert "9 predictions" in capsys.readouterr().out
    with open(tmp_path / "out.csv", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    labels = list(alone[0]["probabilities"])
    assert list(written[0]) == ["id", "review", "note", "prediction", "probability", *(f"p_{x}" for x in labels)]
    for row, out, expected in zip(rows, written, alone):
        assert {k: out[k] for k in row} == row and out["prediction"] == expected["label"]
        assert float(out["probability"]) == pytest.approx(expected["probabilities"][expected["label"]], abs=1e-6)
        assert sum(float(out[f"p_{x}"]) for x in labels) == pytest.approx(1.0, abs=1e-5)
    # JSON lines, a text column named for this file, and a plain-text file of one text a line
    write_jsonl(tmp_path / "new.jsonl", [{"body": r["review"], "n": i, "mixed": i if i % 2 else str(i)}
                                         for i, r in enumerate(rows)])
    assert main(["predict", "--adapter", str(run), "--data", str(tmp_path / "new.jsonl"), "--text-column", "body",
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["n"] for line in lines] == list(range(9))
    assert [line["prediction"] for line in lines] == [r["label"] for r in alone]
    # Parquet: the columns keep their types (a column of numbers and strings mixed is written as text)
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["predict", "--adapter", str(run), "--data", str(tmp_path / "new.jsonl"), "--text-column", "body",
                 "--out", str(tmp_path / "out.parquet")]) == 0
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["n"] for row in table] == list(range(9)) and table[1]["mixed"] == "1"
    assert [row["prediction"] for row in table] == [r["label"] for r in alone]
    assert [row["probability"] for row in table] == pytest.approx(
        [r["probabilities"][r["label"]] for r in alone], abs=1e-6)
    assert sum(table[0][f"p_{x}"] for x in labels) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", "--adapter", str(run), "--data", str(tmp_path / "out.parquet"), "--text-column", "body",
                 "--out", str(tmp_path / "again.csv")]) == 0  # a Parquet file written is one --data reads
    # a folder datasets saved: one split's, read whole (a DatasetDict's root is refused: which split?)
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert main(["predict", "--adapter", str(run), "--data", str(tmp_path / "saved")]) == 2
    assert "give one split's folder" in capsys.readouterr().err
    assert main(["predict", "--adapter", str(run), "--data", str(tmp_path / "saved" / "test"), "--out",
                 str(tmp_path / "saved.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "saved.jsonl").read_text().splitlines()]
    assert [line["prediction"] for line in lines] == [r["label"] for r in alone] and lines[3]["id"] == "3"
    (tmp_path / "new.txt").write_text("\n".join(r["review"] for r in rows[:3]) + "\n\n")
    capsys.readouterr()
    assert main(["predict", "--adapter", str(run), "--data", str(tmp_path / "new.txt")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in printed] == [r["label"] for r in alone[:3]]


def test_what_cannot_be_done_is_refused_in_one_line(run, tmp_path, capsys):
    data = tmp_path / "new.csv"
    data.write_text("review\ngood film\n")
    (tmp_path / "taken.csv").write_text("a user's file\n")
    cases = {
        (str(data),): "is a file; give --data",
        ("--data", str(data), "--out", str(tmp_path / "taken.csv")): "exists; give another path, or --overwrite",
        ("--data", str(data), "--out", str(data), "--overwrite"): "is the --data file itself",
        ("--data", str(data), "--out", str(tmp_path / "p.xlsx")): "written as .csv, .tsv, .jsonl, .parquet",
        ("--data", str(data), "--out", str(tmp_path / "p.csv"), "--adapter", str(run)): "one --adapter",
        ("--out", str(tmp_path / "p.csv"), "good film"): "goes with --data",
        ("--data", str(data), "good film"): "not both",
        (): "give texts to classify",
        ("--data", str(data), "--text-column", "body"): "lacks 'body'",
        ("--data", str(data), "--batch-size", "0"): "--batch-size must be at least 1",
    }
    for extra, message in cases.items():
        assert main(["predict", "--adapter", str(run), *extra]) == 2, extra
        lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
                 if line.strip() and "Loading weights" not in line]  # transformers' bar, where the model loaded
        assert len(lines) == 1 and message in lines[0], (extra, lines)
    assert (tmp_path / "taken.csv").read_text() == "a user's file\n" and data.read_text() == "review\ngood film\n"
    assert main(["predict", "--adapter", str(run), "--data", str(data), "--out", str(tmp_path / "taken.csv"),
                 "--overwrite"]) == 0
    assert (tmp_path / "taken.csv").read_text().startswith("review,prediction,probability,p_")
