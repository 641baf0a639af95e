"""Fixed, seeded train / validation / test splits.

The split seed is fixed and independent of the training seed (``--seed``), so every run
of a task is scored on the very same validation and test examples.
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
                  seed: int = SPLIT_SEED) -> DatasetSplits:
    """Shuffle ``records`` with ``seed`` and cut off a validation and a test part.

    Args:
        validation, test: a count of examples (int) or a fraction of them (float < 1).
        group_key: records sharing this key's value land in the same part (so the same
            question with two answers is never both trained on and scored).

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
        raise LorakitError(f"{source} has {len(keys)} examples: too few for a validation split of {n_val} and a "
                           f"test split of {n_test} with any left to train on; give at least {n_val + n_test + 1}")

    def gather(part):
        return [record for key in part for record in groups[key]]

    return DatasetSplits(train=gather(keys[n_val + n_test:]), validation=gather(keys[:n_val]),
                         test=gather(keys[n_val:n_val + n_test]), source=source)


def _count(size, total: int) -> int:
    if isinstance(size, float) and size < 1:
        return max(1, round(size * total)) if total > 2 else 0
    return int(size)
