"""Folders saved by Hugging Face ``datasets`` (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``),
read with pyarrow alone (``datasets`` itself is not needed).

Layout of such a folder::

    DIR/dataset_dict.json          {"splits": ["train", "test", ...]}   (a DatasetDict)
    DIR/<split>/state.json         {"_data_files": [{"filename": "data-00000-of-00001.arrow"}, ...]}
    DIR/<split>/dataset_info.json  {"features": {"label": {"_type": "ClassLabel", "names": [...]}, ...}}
    DIR/<split>/data-*.arrow       Arrow IPC streams, one row a record

A single ``Dataset`` folder has ``state.json`` at its root. A ``ClassLabel`` column holds
integers; they are read as the class names the features give.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import LorakitError

VALIDATION_NAMES = ("validation", "valid", "val", "dev")  # what a DatasetDict may call its validation split


def is_saved_dataset(folder) -> bool:
    """Whether ``folder`` was written by ``datasets``' ``save_to_disk``."""
    folder = Path(folder)
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def split_names(folder) -> list[str]:
    """The splits of a saved ``DatasetDict`` (``[]`` for a single ``Dataset``)."""
    folder = Path(folder)
    if not (folder / "dataset_dict.json").is_file():
        return []
    return list(_json(folder / "dataset_dict.json").get("splits") or [])


def read_saved_split(folder) -> list[dict]:
    """The rows of one saved ``Dataset`` folder, each with ``"_where"`` (``"train row 7"``).

    Raises:
        LorakitError: ``state.json`` missing or unreadable, or an arrow file missing.
    """
    import pyarrow as pa

    folder = Path(folder)
    state = _json(folder / "state.json")
    names = _class_names(folder)
    rows: list[dict] = []
    for entry in state.get("_data_files") or []:
        path = folder / entry["filename"]
        if not path.is_file():
            raise LorakitError(f"{folder} lists {entry['filename']} in state.json but it is missing; save the "
                               "dataset again with save_to_disk")
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid as err:
                raise LorakitError(f"{path} is not an Arrow stream ({err}); save the dataset again with "
                                   "save_to_disk") from None
        rows.extend(table.to_pylist())
    for number, row in enumerate(rows, start=1):
        for column, classes in names.items():
            if isinstance(row.get(column), int) and 0 <= row[column] < len(classes):
                row[column] = classes[row[column]]
            elif row.get(column) == -1:  # datasets' ClassLabel for "no label" (an unlabelled test split)
                row[column] = None
        row["_where"] = f"{folder.name} row {number}"
    return rows


def _class_names(folder: Path) -> dict[str, list[str]]:
    """``{column: class names}`` of the ``ClassLabel`` columns in ``dataset_info.json``."""
    info_path = folder / "dataset_info.json"
    features = _json(info_path).get("features") or {} if info_path.is_file() else {}
    return {column: list(spec["names"]) for column, spec in features.items()
            if isinstance(spec, dict) and spec.get("_type") == "ClassLabel" and spec.get("names")}


def _json(path: Path) -> dict:
    if not path.is_file():
        raise LorakitError(f"{path.parent} has no {path.name}; give a folder written by datasets' save_to_disk, "
                           "or one holding train/validation files")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorakitError(f"{path} does not parse as JSON ({err}); save the dataset again") from None
