"""Fixed, seeded train / validation / test splits.

The split seed is fixed and independent of the training seed (``--seed``), so every run
of a task is scored on the very same validation and test examples. A user's
classification file is split *stratified*: each class has the same share of the
validation and of the test part as of the whole file, to within one example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorakit.errors import LorakitError

SPLIT_SEED = 1234


@dataclass
class DatasetSplits:
    """Records of one task, split three ways, plus where they came from."""

    train: list
    validation: list
    test: list
    source: str

    def sizes(self) -> dict:
        """``{"train": n, "validation": n, "test": n}`` (examples)."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_records(records: list, validation, test, source: str, group_key: str | None = None,
                  seed: int = SPLIT_SEED, stratify_key: str | None = None) -> DatasetSplits:
    """Shuffle ``records`` with ``seed`` and cut off a validation and a test part.

    Args:
        validation, test: a count of examples (int) or a fraction of them (float < 1).
        group_key: records sharing this key's value land in the same part (so the same
            question with two answers is never both trained on and scored).
        stratify_key: each value of this key (a class) gets its share of the validation
            and the test part: ``count_c = size * n_c / n`` rounded down or up (the largest
            remainders round up, so the sizes add up exactly); groups count by their first record.

    Raises:
        LorakitError: too few records to leave at least one for training.
    """
    groups: dict = {}
    for index, record in enumerate(records):
        key = record[group_key] if group_key else index
        groups.setdefault(key, []).append(record)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_val, n_test = _count(validation, len(keys)), _count(test, len(keys))
    if n_val + n_test >= len(keys):
        held = f"{len(keys)} examples" if not group_key or len(keys) == len(records) else \
            f"{len(keys)} distinct {group_key}s (among {len(records)} records; a repeated one stays in one part)"
        raise LorakitError(f"{source} has {held}: too few for a validation split of {n_val} and a test split of "
                           f"{n_test} with any left to train on; give at least {n_val + n_test + 1}")
    if stratify_key:
        keys = _stratified_order(keys, [groups[key][0][stratify_key] for key in keys], n_val, n_test, seed)

    def gather(part):
        return [record for key in part for record in groups[key]]

    return DatasetSplits(train=gather(keys[n_val + n_test:]), validation=gather(keys[:n_val]),
                         test=gather(keys[n_val:n_val + n_test]), source=source)


def _stratified_order(keys: list, classes: list, n_val: int, n_test: int, seed: int) -> list:
    """``keys`` (shuffled) reordered so that the first ``n_val`` hold each class's share of a
    validation part, the next ``n_test`` its share of a test part, and the rest is training;
    each part shuffled again (a class that filled its validation share early would otherwise
    lead the test part, and ``--data-limit`` takes the first examples of each part).

    A class keeps one example for training when the parts can be filled without it.
    Written here rather than with scikit-learn's ``train_test_split(stratify=...)``, which
    refuses a class of one example and rounds the two cuts one after the other."""
    members: dict = {}
    for key, label in zip(keys, classes):
        members.setdefault(label, []).append(key)
    counts = {label: len(found) for label, found in members.items()}
    # each class keeps one example for training where the other classes can take its share (a long
    # tail of classes with two examples would otherwise leave some with none to learn from)
    val = _quotas(counts, n_val, {label: counts[label] - 1 for label in counts})
    test = _quotas(counts, n_test, {label: counts[label] - 1 - val[label] for label in counts})
    if sum(val.values()) < n_val or sum(test.values()) < n_test:  # they cannot: as many as each class has
        val = _quotas(counts, n_val, counts)
        test = _quotas(counts, n_test, {label: counts[label] - val[label] for label in counts})
    parts: list[list] = [[], [], []]
    for label, found in members.items():
        for i, key in enumerate(found):
            parts[0 if i < val[label] else 1 if i < val[label] + test[label] else 2].append(key)
    shuffle = random.Random(seed + 1).shuffle
    for part in parts:
        shuffle(part)
    return parts[0] + parts[1] + parts[2]


def _quotas(counts: dict, total: int, room: dict) -> dict:
    """Largest-remainder shares of ``total`` in proportion to ``counts``, none above ``room``."""
    n = sum(counts.values())
    exact = {label: total * c / n for label, c in counts.items()}
    quota = {label: min(int(exact[label]), room[label]) for label in counts}
    by_remainder = sorted(counts, key=lambda label: (-(exact[label] - int(exact[label])), str(label)))
    while sum(quota.values()) < total:
        open_ = [label for label in by_remainder if quota[label] < room[label]]
        if not open_:
            break
        # first the classes still under their exact share, largest remainder first
        under = [label for label in open_ if quota[label] < exact[label]]
        quota[(under or open_)[0]] += 1
    return quota


def _count(size, total: int) -> int:
    if isinstance(size, float) and size < 1:
        return max(1, round(size * total)) if size > 0 else 0
    return int(size)
