"""lorakit.data.stream: a file larger than memory read as a stream of blocks, its reader never
holding more than its buffer; seeded splits; every training record once an epoch; resume."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorakit import LorakitError
from lorakit.data.labels import LabelWarning
from lorakit.data.stream import RecordStream, should_stream
from lorakit.report import read_metrics
from lorakit.tasks import get_task, read_splits
from lorakit.train import TrainConfig, TrainingInterrupted, train
from tiny_training import save_tiny_classifier, write_jsonl

WORDS = ["great", "good", "fine", "bad", "dull", "awful"]


def reviews(n: int) -> list[dict]:
    return [{"text": f"the {WORDS[i % 6]} film {i}", "label": "pos" if i % 6 < 3 else "neg"} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rows = reviews(1000)
    jsonl = write_jsonl(root / "big.jsonl", rows)
    text = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(text[:10]) + "\n" + "".join(text[10:]))  # a blank line: numbers still right
    parquet = root / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=96)
    return {"jsonl": jsonl, "parquet": parquet}


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_the_reader_never_holds_more_than_its_buffer_and_an_epoch_sees_every_record_once(files, kind):
    stream = get_task("classify").stream_records(files[kind], None, 32, None)
    assert stream.max_held <= 32  # opening it read every record once, a block at a time
    assert (len(stream.validation), len(stream.test), len(stream)) == (100, 100, 800)
    held_out = {r["text"] for r in stream.validation + stream.test}
    assert len(held_out) == 200
    for epoch in (0, 1):
        seen = [r["text"] for start in range(0, 800, 50) for r in stream.records(7, epoch, start, 50)]
        assert len(seen) == len(set(seen)) == 800 and not held_out & set(seen)
        assert stream.max_held <= 32
    first, second = stream.records(7, 0, 0, 50), stream.records(7, 1, 0, 50)
    assert [r["text"] for r in first] != [r["text"] for r in second]  # each epoch its own order
    assert stream.label_counts == Counter(r["label"] for r in reviews(1000) if r["text"] not in held_out)
    assert len(stream.sample) == 800


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_text_the_file_repeats_is_never_both_trained_on_and_scored(tmp_path, kind):
    rows = [{"text": f"the {WORDS[i // 4 % 6]} film {i // 4}", "label": "pos" if i // 4 % 6 < 3 else "neg"}
            for i in range(1000)]  # every text in four records in a row
    path = write_jsonl(tmp_path / "rep.jsonl", rows)
    if kind == "parquet":
        path = tmp_path / "rep.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=96)
    with pytest.warns(UserWarning, match=r"training records repeat the text of a validation or test record"):
        stream = get_task("classify").stream_records(path, None, 32, None)
    assert (len(stream.validation), len(stream.test)) == (100, 100)
    held_out = {r["text"] for r in stream.validation + stream.test}
    copies = sum(r["text"] in held_out for r in rows) - 200  # the held-out texts' other copies
    assert stream.repeats == copies > 100 and len(stream) == 800 - copies
    trained = [r["text"] for start in range(0, len(stream), 40) for r in stream.records(5, 0, start,
                                                                                       min(40, len(stream) - start))]
    assert len(trained) == len(stream) and not held_out & set(trained)
    assert sum(stream.label_counts.values()) == len(stream) and stream.max_held <= 32


def test_the_split_and_the_order_are_seeded_and_the_same_for_jsonl_and_parquet(files):
    a = get_task("classify").stream_records(files["jsonl"], None, 32, None)
    b = get_task("classify").stream_records(files["parquet"], None, 64, None)
    assert [r["text"] for r in a.validation] == [r["text"] for r in b.validation]
    assert [r["text"] for r in a.records(3, 0, 100, 10)] == [r["text"] for r in a.records(3, 0, 100, 10)]
    # each record names its line: record i is on line i + 1, after the blank line 11 on line i + 2
    for record in a.validation + a.test:
        i, line = int(record["text"].rsplit(" ", 1)[1]), int(record["_where"].removeprefix("big.jsonl line "))
        assert line == i + 1 + (i >= 10)


def test_a_bad_record_is_found_when_the_stream_opens_and_csv_is_not_streamed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", reviews(50) + [{"text": "no label"}] + reviews(5))
    with pytest.raises(LorakitError, match="d.jsonl line 51 lacks 'label'"):
        get_task("classify").stream_records(path, None, 8, None)
    (tmp_path / "d.csv").write_text("text,label\na,b\n")
    with pytest.raises(LorakitError, match="d.csv cannot be streamed"):
        should_stream(tmp_path / "d.csv", True)
    assert not should_stream(path, None)  # small files are read whole unless told


def test_labels_spelling_one_number_are_one_class_in_a_stream(tmp_path):
    rows = [{"text": f"t{i}", "label": [0, "0", 0.0, 1][i % 4]} for i in range(40)]
    with pytest.warns(LabelWarning, match="same number written differently"):
        stream = get_task("classify").stream_records(write_jsonl(tmp_path / "n.jsonl", rows), None, 8, None)
    assert set(stream.label_counts) == {"0", "1"} and sum(stream.label_counts.values()) == len(stream) == 32
    assert {r["label"] for r in stream.validation + stream.test + stream.records(0, 0, 0, 32)} <= {"0", "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny_classifier(tmp_path_factory.mktemp("cls"), dropout=0.1))


def settings(tiny, files, out, **changes):
    base = dict(model=tiny, data=str(files["jsonl"]), stream=True, stream_buffer=40, steps=8, batch_size=16,
                eval_every=4, max_length=16, lora_dropout=0.2, bf16=False, out=str(out), progress=False)
    return TrainConfig(**{**base, **changes})


def test_training_on_a_stream_resumes_to_the_same_run(tiny, files, tmp_path):
    whole = train(settings(tiny, files, tmp_path / "whole"))
    assert whole["data"]["train"] == 800 and whole["data"]["source"].endswith("(streamed)")
    with pytest.raises(TrainingInterrupted):
        train(settings(tiny, files, tmp_path / "parts", stop_after=3))
    train(settings(tiny, files, tmp_path / "parts", resume=True))

    def losses(folder):
        return [line["loss"] for line in read_metrics(folder / "metrics.jsonl") if "lr" in line]

    assert losses(tmp_path / "parts") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)
    assert len(losses(tmp_path / "whole")) == 8
    info = json.loads((tmp_path / "whole" / "adapter" / "lorakit_task.json").read_text())
    assert info["stream"] is True


def test_read_splits_streams_a_file_when_told(files):
    splits = read_splits(get_task("classify"), str(files["parquet"]), stream=True, stream_buffer=50)
    assert isinstance(splits.train, RecordStream) and splits.train.max_held <= 50
