"""What a served adapter's folder says about it beside its weights: ``lorakit_task.json``'s class
names and the length its inputs were cut to in training (a classifier answers as ``lorakit
predict`` does with them)."""

from __future__ import annotations

from pathlib import Path


def task_labels(folder: Path) -> list[str] | None:
    """Class names from ``lorakit_task.json`` beside an adapter (None when there is none)."""
    from lorakit.inference import read_task_file
    from lorakit.run_folder import TASK_FILE

    if not (folder / TASK_FILE).is_file():
        return None
    try:
        labels = read_task_file(folder).get("labels")
    except (ValueError, OSError):
        return None
    return [str(label) for label in labels] if isinstance(labels, list) and labels else None


def task_max_length(folder: Path) -> int | None:
    """The ``max_length`` a classifier adapter was trained with (``lorakit_task.json``), or None."""
    from lorakit.inference import read_task_file
    from lorakit.run_folder import TASK_FILE

    try:
        length = read_task_file(folder).get("max_length") if (folder / TASK_FILE).is_file() else None
    except (ValueError, OSError):
        return None
    return length if isinstance(length, int) and length > 0 else None
