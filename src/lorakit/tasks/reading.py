"""Reading a task's data: the embedded set, a user's file split with a fixed seed, a folder
of split files, a folder saved by Hugging Face ``datasets``, or a stream.

Records that share the task's :attr:`~lorakit.tasks.base.Task.group_key` (a classifier's text,
a prompt) land in the same part of a split, so a text the file repeats is never both trained
on and scored; splits given ready-made (a folder) that repeat one in validation or test are
warned about, since their scores then flatter the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lorakit import data as lkdata
from lorakit.data import arrow, compressed, files
from lorakit.data.stream import should_stream
from lorakit.errors import LorakitError
from lorakit.tasks.base import Task


def read_splits(task: Task, data: str, limit: int | None = None, columns: dict | None = None,
                stream: bool | None = None, stream_buffer: int = 10_000) -> lkdata.DatasetSplits:
    """The records of ``data``: ``"default"`` (the task's embedded set), a file (split
    80/10/10 with a fixed seed, stratified by the task's :attr:`Task.stratify_key`), a
    folder saved by Hugging Face ``datasets``, or a folder holding ``train``,
    ``validation`` and optionally ``test`` files (any of :data:`lorakit.data.files.SUFFIXES`).

    A JSONL or Parquet file larger than memory (or any, with ``stream``) is streamed:
    its ``train`` is a :class:`~lorakit.data.stream.RecordStream`, read block by block.

    ``limit`` keeps the first ``limit`` training records and a tenth as many for
    validation and test (for quick runs and tests); a streamed file is read only up to
    its first ``limit`` records.
    """
    path = Path(data)
    if data == "default":
        splits = task.default_data()
    elif path.is_dir() and arrow.is_saved_dataset(path):
        splits = _read_saved_dataset(path, task, columns)
    elif path.is_dir():
        splits = _read_folder(path, task, columns)
    elif should_stream(path, stream):
        records = task.stream_records(path, columns, stream_buffer, limit)
        return lkdata.DatasetSplits(records, records.validation, records.test, f"{path} (streamed)")
    else:
        splits = _split(task, task.read_records(path, columns), str(path))
    if data != "default":
        _warn_repeats(task, splits)
    if limit is not None:
        small = max(1, limit // 10)
        splits = lkdata.DatasetSplits(splits.train[:limit], splits.validation[:small], splits.test[:small],
                                      f"{splits.source}, --data-limit {limit}")
    return splits


def _group_key(task: Task, records: list[dict]) -> str | None:
    """The first of the task's :attr:`~lorakit.tasks.base.Task.group_keys` the records hold."""
    return next((key for key in task.group_keys if records and key in records[0]), None)


def _split(task: Task, records: list[dict], source: str, validation=0.1, test=0.1) -> lkdata.DatasetSplits:
    return lkdata.split_records(records, validation, test, source=source, group_key=_group_key(task, records),
                                stratify_key=task.stratify_key)


def _warn_repeats(task: Task, splits: lkdata.DatasetSplits) -> None:
    """Warn once when validation or test records repeat a training record's group key (its text)."""
    key = _group_key(task, splits.train)
    if key is None:
        return
    trained = {record.get(key) for record in splits.train}
    found = [(name, sum(record.get(key) in trained for record in part), len(part))
             for name, part in (("validation", splits.validation), ("test", splits.test))]
    found = [f"{n:,} of the {total:,} {name} examples" for name, n, total in found if n]
    if found:
        warnings.warn(f"{splits.source}: {' and '.join(found)} repeat a {key} of the training split, so their scores "
                      f"flatter the model; remove the repeats from those splits (a single file lorakit splits keeps "
                      f"each {key} in one part)", stacklevel=3)


def _read_saved_dataset(folder: Path, task: Task, columns) -> lkdata.DatasetSplits:
    """A ``save_to_disk`` folder: a ``DatasetDict``'s train / validation / test (a missing
    validation split is cut from train), or one ``Dataset`` split as a file is."""
    names = arrow.split_names(folder)
    if not names:
        return _split(task, task.check_records(arrow.read_saved_split(folder), folder.name, columns), str(folder))
    if "train" not in names:
        raise LorakitError(f"the dataset saved in {folder} has splits {names} but no 'train'; name the training "
                           "split train")

    def read(name):
        return task.check_records(arrow.read_saved_split(folder / name), f"{folder.name}/{name}", columns)

    train = read("train")
    validation_name = next((name for name in arrow.VALIDATION_NAMES if name in names), None)
    test = read("test") if "test" in names else []
    unused = [name for name in names if name not in ("train", "test", validation_name)]
    if unused:
        warnings.warn(f"the dataset saved in {folder} has splits {unused} that lorakit does not use; it reads "
                      f"train, test and one validation split named {' or '.join(arrow.VALIDATION_NAMES)}",
                      stacklevel=3)
    if validation_name is None:
        cut = _split(task, train, str(folder), validation=0.1, test=0)
        return lkdata.DatasetSplits(cut.train, cut.validation, test, f"{folder} (validation cut from train)")
    return lkdata.DatasetSplits(train, read(validation_name), test, str(folder))


def _read_folder(folder: Path, task: Task, columns) -> lkdata.DatasetSplits:
    entries = sorted(folder.iterdir())

    def find(stem, required=True):
        found = [f for f in entries if f.is_file() and compressed.stem(f) == stem
                 and compressed.format_suffix(f) in files.SUFFIXES]
        if not found and required:
            raise LorakitError(f"data folder {folder} has no {stem} file ({files.FORMATS}), nor is it "
                               f"a folder saved by datasets; it holds {[p.name for p in entries][:10]}")
        if len(found) > 1:
            raise LorakitError(f"data folder {folder} has {len(found)} {stem} files ({', '.join(f.name for f in found)}); "
                               "keep one of them there")
        return task.read_records(found[0], columns) if found else []

    return lkdata.DatasetSplits(find("train"), find("validation"), find("test", required=False), str(folder))
