"""lorakit.data.labels: a number written several ways is one class, other labels stay as written."""

import warnings

import pytest

from lorakit.data import read_records
from lorakit.data.labels import LabelWarning, class_order, find_label, merge_number_spellings
from lorakit.tasks import get_task
from tiny_training import write_jsonl


def test_labels_spelling_one_number_become_one_class_with_one_warning(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "0"},
                                              {"text": "c", "label": 0.0}, {"text": "d", "label": 1},
                                              {"text": "e", "label": "1.0"}, {"text": "f", "label": " 1 "}])
    with pytest.warns(LabelWarning) as caught:
        records = read_records(path, "classify")
    assert [r["label"] for r in records] == ["0", "0", "0", "1", "1", "1"]
    assert len(caught) == 1
    assert str(caught[0].message) == ("d.jsonl: labels that are the same number written differently are one class "
                                      "(0, 0.0 -> 0; 1, 1.0 -> 1)")


def test_labels_that_spell_each_number_once_are_left_as_written(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\na,01\nb,02\nc,pos\nd,1e3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = read_records(tmp_path / "d.csv", "classify")
    assert [r["label"] for r in records] == ["01", "02", "pos", "1e3"]


def test_a_number_finds_its_class_whatever_its_spelling():
    records = [{"label": "0.50"}, {"label": "0.5"}, {"label": "nan"}, {"label": "NaN"}]
    with pytest.warns(LabelWarning, match=r"0.5, 0.50 -> 0.5"):
        merge_number_spellings(records, "x")
    assert [r["label"] for r in records] == ["0.5", "0.5", "nan", "NaN"]  # nan is no number to merge
    label2id = {"0": 0, "1": 1, "pos": 2}
    assert [find_label(label2id, label) for label in ("1", "1.0", "0.0", "pos", "2", "Pos")] == [1, 1, 0, 2, None, 2]


def test_labels_that_differ_only_in_case_stay_apart_with_a_warning(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\na,pos\nb,Pos\nc,neg\n")
    with pytest.warns(LabelWarning, match=r"differ only in case are separate classes \(Pos / pos\)"):
        records = read_records(tmp_path / "d.csv", "classify")
    assert sorted({r["label"] for r in records}) == ["Pos", "neg", "pos"]


def test_a_label_in_another_case_finds_its_class_when_only_one_fits():
    assert find_label({"False": 0, "True": 1}, "false") == 0
    assert find_label({"Pos": 0, "pos": 1, "neg": 2}, "POS") is None  # two classes fit: unknown


def test_classes_are_numbered_by_value_then_with_digits_read_as_numbers():
    assert class_order(["10", "2", "0", "1", "-1", "1.5", "11"]) == ["-1", "0", "1", "1.5", "2", "10", "11"]
    assert class_order(["class10", "class2", "class1", "b", "a"]) == ["a", "b", "class1", "class2", "class10"]
    assert class_order(["pos", "neg", "3", "12"]) == ["3", "12", "neg", "pos"]
    assert class_order(["x1", "x01"]) == ["x01", "x1"]  # the same number: the text decides


def test_the_labels_0_to_11_get_the_ids_0_to_11():
    train = [{"text": f"t{i}", "label": str(i % 12)} for i in range(48)]
    labels = get_task("classify").labels(train, "d.csv")
    assert {i: name for i, name in enumerate(labels)} == {i: str(i) for i in range(12)}
