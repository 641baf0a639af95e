"""Class labels: one class per label, even when a number is written two ways.

A label is kept as the text the user wrote (``"fresh"``, ``"01"``). Labels that are the
same number written differently (``0``, ``"0"``, ``0.0`` in one JSONL file, or ``1`` in
train.csv and ``1.0`` in test.csv) are one class: within a file they are merged into
the number's plain form with a warning (:func:`merge_number_spellings`), and across
files a label is matched to the known label of the same number (:func:`find_label`).
"""

from __future__ import annotations

import re
import warnings
from decimal import Decimal, InvalidOperation


class LabelWarning(UserWarning):
    """Labels were changed: several spellings of one number became one class."""


def number_value(label: str) -> Decimal | None:
    """The number a label spells (``"1.0"`` -> 1), or None when it is not a finite number."""
    try:
        value = Decimal(label.strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def plain_number(value: Decimal) -> str:
    """A number written plainly: ``0``, ``12``, ``0.5`` (no exponent, no trailing zeros)."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def merge_number_spellings(records: list[dict], source: str) -> list[dict]:
    """Give records whose labels spell the same number one label, and warn once if any did.

    Labels that spell a number only one way are left as written (``"01"`` stays ``"01"``).
    Changes ``records`` in place and returns them.
    """
    labels = {record["label"] for record in records}
    renamed = number_renames(labels, source)
    for record in records:
        record["label"] = renamed.get(record["label"], record["label"])
    warn_case_variants(labels, source)
    return records


def warn_case_variants(labels, source: str) -> None:
    """Warn once when labels differ only in case or surrounding space (``Pos`` and ``pos``):
    they stay separate classes, as written, but are more often one class typed two ways."""
    variants: dict[str, set[str]] = {}
    for label in labels:
        variants.setdefault(label.strip().casefold(), set()).add(label)
    alike = [sorted(names) for names in variants.values() if len(names) > 1]
    if alike:
        shown = "; ".join(" / ".join(names) for names in sorted(alike))
        warnings.warn(f"{source}: labels that differ only in case are separate classes ({shown}); "
                      "if they are one class, write them one way", LabelWarning, stacklevel=4)


def number_renames(labels, source: str) -> dict[str, str]:
    """``{spelling: plain number}`` for the labels among ``labels`` (distinct label texts)
    that spell one number several ways; warns once, naming ``source``, when there are any.
    (A streamed file collects its distinct labels in one pass and renames as it reads.)"""
    spellings: dict[Decimal, set[str]] = {}
    for label in labels:
        value = number_value(label)
        if value is not None:
            spellings.setdefault(value, set()).add(label)
    merged = {value: names for value, names in spellings.items() if len(names) > 1}
    if not merged:
        return {}
    shown = "; ".join(f"{', '.join(sorted(names))} -> {plain_number(value)}" for value, names in sorted(merged.items()))
    warnings.warn(f"{source}: labels that are the same number written differently are one class ({shown})",
                  LabelWarning, stacklevel=4)
    return {name: plain_number(value) for value, names in merged.items() for name in names}


def class_order(labels) -> list[str]:
    """The labels in the order their classes are numbered: labels that are numbers by value
    (``"2"`` before ``"10"``, so the labels 0…k-1 get the ids 0…k-1), then the others with their
    digits read as numbers (``"class2"`` before ``"class10"``), ties broken by the text."""
    def key(label: str):
        value = number_value(label)
        if value is not None:
            return (0, value, label)
        parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", label) if p)
        return (1, parts, label)

    return sorted(labels, key=key)


def find_label(label2id: dict[str, int], label: str) -> int | None:
    """The class index of ``label`` in ``label2id``: by its text, else by the number it
    spells (``"1.0"`` finds the class ``"1"``), else by its text in any case when one class
    alone fits (``"false"`` finds ``"False"``); None if unknown."""
    if label in label2id:
        return label2id[label]
    value = number_value(label)
    if value is not None:
        matches = {i for name, i in label2id.items() if number_value(name) == value}
    else:  # "false" in a CSV finds the class "False" a JSON boolean gave, when no other label fits
        matches = {i for name, i in label2id.items() if name.casefold() == label.casefold()}
    return matches.pop() if len(matches) == 1 else None
