"""lorakit.tasks.reading: a text a file repeats lands in one part of the split; ready-made splits
that repeat a training text in validation or test are warned about."""

import warnings

import pytest

from lorakit.data import split_records
from lorakit.tasks import get_task, read_splits
from tiny_training import write_jsonl


def test_a_repeated_text_is_never_both_trained_on_and_scored(tmp_path):
    rows = [{"text": f"review {i % 60}", "label": "ab"[i % 60 % 2]} for i in range(240)]  # each text 4 times
    splits = read_splits(get_task("classify"), str(write_jsonl(tmp_path / "d.jsonl", rows)))
    trained = {r["text"] for r in splits.train}
    assert splits.validation and splits.test
    assert not trained & {r["text"] for r in splits.validation + splits.test}
    assert not {r["text"] for r in splits.validation} & {r["text"] for r in splits.test}
    assert sum(splits.sizes().values()) == 240


def test_a_file_without_repeats_is_split_as_before():
    rows = [{"text": f"t{i}", "label": "abc"[i % 3], "_where": str(i)} for i in range(100)]
    grouped = split_records(rows, 0.1, 0.1, "d", group_key="text", stratify_key="label")
    plain = split_records(rows, 0.1, 0.1, "d", stratify_key="label")
    assert grouped == plain


def test_ready_made_splits_that_repeat_training_texts_are_warned_about(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "t1", "label": "b"}, {"text": "new", "label": "a"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "t2", "label": "a"}, {"text": "t3", "label": "b"},
                                          {"text": "other", "label": "a"}])
    with pytest.warns(UserWarning, match=r"1 of the 2 validation examples and 2 of the 3 test examples repeat a "
                                         r"text of the training split, so their scores flatter the model"):
        read_splits(get_task("classify"), str(tmp_path))
    write_jsonl(tmp_path / "test.jsonl", [{"text": "other", "label": "a"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "new", "label": "a"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_splits(get_task("classify"), str(tmp_path))
