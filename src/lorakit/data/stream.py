"""A JSONL or Parquet file larger than memory, read as a stream of blocks.

Seed 002's "handling large datasets": the records are never all held at once. A file is
cut into *blocks* of ``buffer`` records (the buffer cap: the reader never holds more
records than that). Two passes open the stream:

1. count the records (and note where each block starts: a byte offset and a line number
   in a JSONL file, a row number in a Parquet file);
2. read every record once, checking it as the in-memory readers do (every mistake is
   found before training starts), keeping the held-out records, counting the classes
   and keeping a seeded sample of the training records for the recipe's statistics.
   Where the task groups records by a text (``group_keys``), the held-out records are read
   first (their lines alone parsed), so that training records repeating one of their texts
   are left out of training: a text is never both trained on and scored.

The split is seeded: ``min(10%, 1,000)`` records each for validation and test, drawn
with the fixed split seed from all record numbers (held in memory; the rest trains).
The training order of an epoch is a pure function of (seed, epoch): the blocks in a
seeded order, each block's records shuffled. So a resumed run, which reads on from the
block of its step, sees exactly the batches of a run never stopped.
"""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable

from lorakit.data.compressed import compression
from lorakit.errors import LorakitError

STREAM_ABOVE_BYTES = 1 << 30  # a file larger than this is streamed unless told otherwise
STREAM_SUFFIXES = (".jsonl", ".parquet")
HELD_OUT_FRACTION = 0.1  # of the records, for validation and for test each
HELD_OUT_CAP = 1000  # at most this many records each
SAMPLE_SIZE = 2000  # training records kept for the recipe's statistics
SPLIT_SEED = 1234


def should_stream(path, stream: bool | None) -> bool:
    """Whether ``path`` is read as a stream: as told, else when it is larger than
    :data:`STREAM_ABOVE_BYTES`.

    Raises:
        LorakitError: streaming asked for a file that is neither JSONL nor Parquet.
    """
    path = Path(path)
    if stream is None:
        stream = path.is_file() and path.suffix.lower() in STREAM_SUFFIXES and path.stat().st_size > STREAM_ABOVE_BYTES
    if stream and compression(path):
        raise LorakitError(f"{path.name} cannot be streamed while compressed (a stream enters the file at a record's "
                           "byte offset); decompress it, or drop --stream to read it whole")
    if stream and path.suffix.lower() not in STREAM_SUFFIXES:
        raise LorakitError(f"{path.name} cannot be streamed: lorakit streams {', '.join(STREAM_SUFFIXES)} files; "
                           "convert it, or drop --stream")
    return bool(stream)


class RecordStream:
    """The training records of a streamed file (validation and test are in memory).

    Attributes:
        path: the file.
        buffer: records per block, the most the reader holds at once.
        validation, test: the held-out records (checked).
        label_counts: training records per label (``Counter``; empty for records without labels).
        sample: up to :data:`SAMPLE_SIZE` training records, a seeded uniform sample.
        max_held: the most records the reader has held at once (for tests and reports).
    """

    def __init__(self, path, check_factory: Callable[[dict], Callable[[dict], dict]], buffer: int = 10_000,
                 limit: int | None = None, rename_labels: Callable[[set, str], dict] | None = None,
                 group_keys: tuple[str, ...] = ()):
        """Args:
            check_factory: ``first raw record -> check(raw) -> record`` (a reader's checker).
            limit: read only the first ``limit`` records of the file (quick trials).
            rename_labels: ``(distinct labels, source) -> {label: new label}`` applied to
                every record read (one class per number, :func:`lorakit.data.labels.number_renames`).
            group_keys: the task's :attr:`~lorakit.tasks.base.Task.group_keys`; the first the
                records hold is the text a training record may not share with a held-out one.
        """
        if buffer < 1:
            raise LorakitError(f"the stream buffer must hold at least one record, got {buffer}")
        self.path, self.buffer = Path(path), buffer
        self.parquet = self.path.suffix.lower() == ".parquet"
        self._blocks, self.total = self._index(limit)
        if self.total == 0:
            raise LorakitError(f"data file {self.path} holds no records; add at least one line of data")
        held = min(HELD_OUT_CAP, max(1, round(HELD_OUT_FRACTION * self.total))) if self.total > 2 else 0
        drawn = random.Random(SPLIT_SEED).sample(range(self.total), 2 * held)
        self._part = {index: (0 if i < held else 1) for i, index in enumerate(drawn)}  # 0 validation, 1 test
        self.max_held = 0
        self._check = None
        self._renames: dict = {}
        self.repeats = 0  # training records left out: they repeat a held-out record's text
        self.validation, self.test, self.sample, labels = self._first_pass(check_factory, group_keys)
        if rename_labels is not None and labels:
            self._renames = rename_labels(labels, self.path.name)
            for record in self.validation + self.test + self.sample:
                self._rename(record)
        self.label_counts = Counter({self._renames.get(k, k): 0 for k in labels})
        for label, n in self._train_label_counts.items():
            self.label_counts[self._renames.get(label, label)] += n
        held_in_block = Counter(index // self.buffer for index in self._part)
        self._train_in_block = [size - held_in_block[k] for k, (_, size) in enumerate(self._block_rows())]

    def __len__(self) -> int:
        return self.total - len(self._part)

    # ---- reading blocks

    def _index(self, limit):
        """``([(where it starts, first line or row number)] per block, records)``."""
        if self.parquet:
            from lorakit.data.files import parquet_file

            total = parquet_file(self.path).metadata.num_rows
            total = min(total, limit) if limit else total
            return [(k, k) for k in range(0, total, self.buffer)], total
        blocks, total, offset = [], 0, 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    if limit and total == limit:
                        break
                    if total % self.buffer == 0:
                        blocks.append((offset, number))
                    total += 1
                offset += len(line)
        return blocks, total

    def _block_rows(self):
        """``(first record number, records)`` of every block."""
        return [(k * self.buffer, min(self.buffer, self.total - k * self.buffer)) for k in range(len(self._blocks))]

    def _read_block(self, k: int, only: dict | None = None) -> list[dict]:
        """The raw records of block ``k``, each with ``"_where"`` and ``"_index"`` (its number);
        ``only``: just the records whose numbers it holds (the other lines are not parsed)."""
        start, size = self._block_rows()[k]
        if self.parquet:
            rows = _parquet_rows(str(self.path), start, size)
            records = [{**row, "_where": f"{self.path.name} row {start + i + 1}", "_index": start + i}
                       for i, row in enumerate(rows) if only is None or start + i in only]
        else:
            offset, number = self._blocks[k]
            records, index = [], start
            with open(self.path, encoding="utf-8-sig") as handle:
                handle.seek(offset)
                while index < start + size:
                    line = handle.readline()
                    if line.strip():
                        if only is None or index in only:
                            records.append({**_parse_line(line, f"{self.path.name} line {number}"), "_index": index})
                        index += 1
                    number += 1
        self.max_held = max(self.max_held, len(records))
        return records

    def _checked(self, raw: dict) -> dict:
        if self._check is None:
            self._check = self._check_factory(raw)
        index = raw.pop("_index")
        record = self._check(raw)
        record["_index"] = index
        return self._rename(record)

    def _rename(self, record: dict) -> dict:
        if "label" in record and record["label"] in self._renames:
            record["label"] = self._renames[record["label"]]
        return record

    def _first_pass(self, check_factory, group_keys: tuple[str, ...]):
        """Check every record; keep the held-out ones and a training sample; count labels.
        With ``group_keys``, the held-out records are read first and training records that
        repeat one of their texts are left out (``_part`` 2, counted in :attr:`repeats`)."""
        self._check_factory = check_factory
        held: dict[int, list] = {0: [], 1: []}
        sample, seen, labels = [], 0, set()
        self._train_label_counts: Counter = Counter()
        chooser = random.Random(SPLIT_SEED + 1)
        key, texts = None, set()
        if group_keys and self._part:
            for k in sorted({index // self.buffer for index in self._part}):
                for raw in self._read_block(k, only=self._part):
                    record = self._checked(raw)
                    held[self._part[record["_index"]]].append(record)
            key = next((name for name in group_keys if name in held[0][0]), None) if held[0] else None
            texts = {record.get(key) for record in held[0] + held[1]} if key else set()
            labels.update(record["label"] for record in held[0] + held[1] if "label" in record)
        for k in range(len(self._blocks)):
            for raw in self._read_block(k):
                index = raw["_index"]
                if key is not None and index in self._part:
                    continue  # read and checked above
                record = self._checked(raw)
                if "label" in record:
                    labels.add(record["label"])
                if index in self._part:
                    held[self._part[index]].append(record)
                    continue
                if key is not None and record.get(key) in texts:
                    self._part[index] = 2  # a held-out text: not trained on
                    self.repeats += 1
                    continue
                if "label" in record:
                    self._train_label_counts[record["label"]] += 1
                seen += 1  # reservoir sampling (Algorithm R)
                if len(sample) < SAMPLE_SIZE:
                    sample.append(record)
                elif (j := chooser.randrange(seen)) < SAMPLE_SIZE:
                    sample[j] = record
        if self.repeats:
            warnings.warn(f"{self.path.name}: {self.repeats:,} training records repeat the {key} of a validation or "
                          "test record and are left out of training, so the scores are of texts not trained on",
                          stacklevel=2)
        return held[0], held[1], sample, labels

    # ---- the training order

    def order(self, seed: int, epoch: int) -> list[int]:
        """The blocks of ``epoch`` in their seeded order."""
        return _block_order(len(self._blocks), seed, epoch)

    def records(self, seed: int, epoch: int, start: int, count: int) -> list[dict]:
        """Training records ``start .. start + count - 1`` of ``epoch``'s order.

        Raises:
            IndexError: past the end of the epoch.
        """
        out, position = [], 0
        for k in self.order(seed, epoch):
            size = self._train_in_block[k]
            if position + size > start and len(out) < count:
                block = self._shuffled_block(k, seed, epoch)
                take = block[max(0, start - position):max(0, start - position) + count - len(out)]
                out.extend(take)
            position += size
            if len(out) == count:
                return out
        raise IndexError(f"training record {start + count - 1} is past the end of the epoch ({position})")

    def _shuffled_block(self, k: int, seed: int, epoch: int) -> list[dict]:
        key = (k, seed, epoch)
        if getattr(self, "_cached_key", None) != key:
            self._cached = None  # let the previous block go before the next is read
            records = [self._checked(raw) for raw in self._read_block(k)]
            records = [r for r in records if r["_index"] not in self._part]
            random.Random(seed * 1_000_003 + epoch * 7_919 + k).shuffle(records)
            self._cached_key, self._cached = key, records
        return self._cached


@lru_cache(maxsize=4)
def _block_order(blocks: int, seed: int, epoch: int) -> list[int]:
    order = list(range(blocks))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _parquet_rows(path: str, start: int, size: int) -> list[dict]:
    """Rows ``start .. start + size - 1`` of a Parquet file, reading only the row groups that hold them."""
    from lorakit.data.files import parquet_file

    handle = parquet_file(Path(path))
    rows, first = [], 0
    for g in range(handle.metadata.num_row_groups):
        n = handle.metadata.row_group(g).num_rows
        if first + n > start and first < start + size:
            table = handle.read_row_group(g)
            lo = max(0, start - first)
            rows.extend(table.slice(lo, min(n, start + size - first) - lo).to_pylist())
        first += n
    return rows


def _parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise LorakitError(f"{where} is not valid JSON ({err.msg} at column {err.pos + 1}); each line must be one "
                           "JSON object") from None
    if not isinstance(record, dict):
        raise LorakitError(f"{where} holds a {type(record).__name__}, not a JSON object")
    record["_where"] = where
    return record


class EncodedStream:
    """The training examples of a :class:`RecordStream`, encoded as their block is read.

    ``len()`` is the number of training records; :meth:`batch` is what
    :func:`lorakit.data.batches.batch_of_step` asks for.
    """

    def __init__(self, records: RecordStream, encode: Callable[[list[dict]], list]):
        self.records, self.encode = records, encode

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> list:
        """The encoded examples of optimizer step ``step`` (examples that encoding drops,
        with nothing left to train on, are missing from it)."""
        epoch, position = divmod(step, steps_per_epoch)
        return self.encode(self.records.records(seed, epoch, position * global_batch, global_batch))
