"""What a served adapter's folder says about it beside its weights: ``lorakit_task.json``'s class
names and the length its inputs were cut to in training (a classifier answers as ``lorakit
predict`` does with them), and the chat template it was trained with (``chat_template.jinja``)."""

from __future__ import annotations

from pathlib import Path


def task_facts(folder: Path) -> tuple[list[str] | None, int | None, bool]:
    """``(class names, max_length, pairs)`` from ``lorakit_task.json`` beside an adapter; None for
    what the file does not say (or when there is no readable file); ``pairs``: trained on pairs of texts."""
    from lorakit.inference import read_task_file
    from lorakit.run_folder import TASK_FILE

    try:
        info = read_task_file(folder) if (folder / TASK_FILE).is_file() else {}
    except (ValueError, OSError):
        info = {}
    labels, length = info.get("labels"), info.get("max_length")
    return ([str(label) for label in labels] if isinstance(labels, list) and labels else None,
            length if isinstance(length, int) and length > 0 else None, info.get("pairs") is True)


TEMPLATE_MAX_BYTES = 100_000  # a chat template is a few kB; a larger file is not read


def trained_template(folder: Path) -> str | None:
    """The chat template saved beside an adapter (``lorakit train --chat-template``), or None
    where there is none (or no readable one of a sensible size)."""
    from lorakit.chat_templates import FILE, saved

    try:
        if (folder / FILE).is_file() and (folder / FILE).stat().st_size > TEMPLATE_MAX_BYTES:
            return None
        return saved(folder) or None
    except (OSError, UnicodeDecodeError):
        return None
