"""lorakit.data.arrow: folders written by Hugging Face datasets' save_to_disk, read with pyarrow."""

import pytest

datasets = pytest.importorskip("datasets")

from lorakit import LorakitError  # noqa: E402
from lorakit.tasks import get_task, read_splits  # noqa: E402


def dataset(n: int, offset: int = 0):
    features = datasets.Features({"review": datasets.Value("string"),
                                  "rating": datasets.ClassLabel(names=["neg", "pos", "mixed"])})
    return datasets.Dataset.from_dict({"review": [f"review {offset + i}" for i in range(n)],
                                       "rating": [i % 3 for i in range(n)]}, features=features)


def test_a_saved_dataset_dict_reads_its_splits_with_class_names(tmp_path):
    datasets.DatasetDict({"train": dataset(30), "validation": dataset(6, 100), "test": dataset(6, 200)}).save_to_disk(
        tmp_path / "dd")
    splits = read_splits(get_task("classify"), str(tmp_path / "dd"),
                         columns={"text": "review", "label": "rating"})
    assert [len(p) for p in (splits.train, splits.validation, splits.test)] == [30, 6, 6]
    assert splits.train[4] == {"text": "review 4", "label": "pos", "_where": "train row 5"}
    assert splits.test[0]["text"] == "review 200" and {r["label"] for r in splits.train} == {"neg", "pos", "mixed"}


def test_a_dict_without_validation_has_one_cut_from_train_and_a_single_dataset_is_split(tmp_path):
    datasets.DatasetDict({"train": dataset(60), "test": dataset(9, 100)}).save_to_disk(tmp_path / "dd")
    splits = read_splits(get_task("classify"), str(tmp_path / "dd"), columns={"text": "review", "label": "rating"})
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (54, 6, 9)
    assert sorted(r["label"] for r in splits.validation) == ["mixed", "mixed", "neg", "neg", "pos", "pos"]
    dataset(50).save_to_disk(tmp_path / "one")
    splits = read_splits(get_task("classify"), str(tmp_path / "one"), columns={"text": "review", "label": "rating"})
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 5, 5)


def test_a_chat_dataset_with_its_own_column_name(tmp_path):
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(20)]
    datasets.Dataset.from_dict({"conversation": chats}).save_to_disk(tmp_path / "chat")
    splits = read_splits(get_task("chat"), str(tmp_path / "chat"), columns={"messages": "conversation"})
    assert len(splits.train) == 16 and splits.train[0]["messages"][1]["role"] == "assistant"


def test_missing_columns_and_splits_are_named(tmp_path):
    dataset(10).save_to_disk(tmp_path / "one")
    with pytest.raises(LorakitError, match=r"lacks 'text', 'label'; it has keys \['rating', 'review'\]"):
        read_splits(get_task("classify"), str(tmp_path / "one"))
    with pytest.raises(LorakitError, match=r"lacks 'body' \(--text-column\)"):
        read_splits(get_task("classify"), str(tmp_path / "one"), columns={"text": "body", "label": "rating"})
    datasets.DatasetDict({"training": dataset(10)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(LorakitError, match=r"has splits \['training'\] but no 'train'"):
        read_splits(get_task("classify"), str(tmp_path / "dd"))


def test_a_val_split_is_the_validation_others_are_named_and_unlabelled_rows_refused(tmp_path):
    datasets.DatasetDict({"train": dataset(30), "val": dataset(6, 100), "extra": dataset(3)}).save_to_disk(
        tmp_path / "dd")
    with pytest.warns(UserWarning, match=r"splits \['extra'\] that lorakit does not use"):
        splits = read_splits(get_task("classify"), str(tmp_path / "dd"), columns={"text": "review", "label": "rating"})
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (30, 6, 0)
    unlabelled = dataset(10).map(lambda row, i: {"rating": -1 if i == 4 else row["rating"]}, with_indices=True)
    datasets.DatasetDict({"train": unlabelled}).save_to_disk(tmp_path / "minus")
    with pytest.raises(LorakitError, match="train row 5 has no value for 'rating'"):
        read_splits(get_task("classify"), str(tmp_path / "minus"), columns={"text": "review", "label": "rating"})
