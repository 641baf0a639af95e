"""Read a user's data file into records, checking it completely before training starts.

Formats (chosen by the file's suffix):

- ``.jsonl`` (one JSON object a line; blank lines skipped) and ``.csv`` (a header row).
- Classification (``kind="classify"``): every record has ``text`` and ``label``.
- Language modelling (``kind="lm"``), one of three shapes, the same on every line:
  ``prompt`` + ``completion`` (the prompt is masked out of the loss), ``messages``
  (a chat: a list of ``{"role", "content"}``, rendered with the tokenizer's chat
  template, only assistant turns trained), or plain ``text`` (every token trained).

Every record keeps where it came from in ``record["_where"]`` (``"data.jsonl line 7"``),
so later checks (an unknown label) can point at the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lorakit.errors import LorakitError

SUFFIXES = (".jsonl", ".csv")
CLASSIFY_KEYS = ("text", "label")
LM_SHAPES = {  # shape name -> the keys it needs
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
CHAT_ROLES = ("system", "user", "assistant")


def read_records(path, kind: str) -> list[dict]:
    """Records of ``path`` for a task ``kind`` (``"classify"`` or ``"lm"``).

    Returns:
        A list of dicts: ``{"text", "label"}`` (label as a string) for classify;
        ``{"prompt", "completion"}``, ``{"messages"}`` or ``{"text"}`` for lm; each
        with ``"_where"``.

    Raises:
        LorakitError: the file is missing or empty, has an unknown suffix, a line does
            not parse (its number is given), or a record lacks the keys the task
            needs (the keys found are listed).
    """
    path = Path(path)
    if kind not in ("classify", "lm"):
        raise LorakitError(f"kind must be 'classify' or 'lm', got {kind!r}")
    if not path.exists():
        raise LorakitError(f"data file {path} does not exist; give a .jsonl or .csv file")
    if path.is_dir():
        raise LorakitError(f"data path {path} is a folder; give a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LorakitError(f"data file {path} has suffix {suffix!r}; lorakit reads {', '.join(SUFFIXES)}")
    raw = _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    if not raw:
        raise LorakitError(f"data file {path} holds no records; add at least one line of data")
    check = _check_classify if kind == "classify" else _lm_checker(raw[0])
    return [check(record) for record in raw]


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LorakitError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); "
                                   "each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise LorakitError(f"{where} holds a {type(record).__name__}, not a JSON object like "
                                   '{"text": ..., "label": ...}')
            record["_where"] = where
            records.append(record)
    return records


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            rows = []
            for row in reader:
                if None in row:
                    raise LorakitError(f"{path.name} line {reader.line_num} has more fields than the header "
                                       f"{reader.fieldnames}; quote values that contain commas")
                if not any((value or "").strip() for value in row.values()):
                    continue
                row["_where"] = f"{path.name} line {reader.line_num}"
                rows.append(row)
        except csv.Error as err:
            raise LorakitError(f"{path.name} line {reader.line_num} does not parse as CSV ({err})") from None
    return rows


def _keys_found(record: dict) -> list[str]:
    return sorted(key for key in record if key != "_where")


def _require(record: dict, keys, what: str) -> None:
    missing = [key for key in keys if record.get(key) is None]
    if missing:
        raise LorakitError(f"{record['_where']} lacks {', '.join(map(repr, missing))}; it has keys "
                           f"{_keys_found(record)}; {what}")


def _check_classify(record: dict) -> dict:
    _require(record, CLASSIFY_KEYS, "classification data needs 'text' and 'label' on every line")
    text, label = record["text"], record["label"]
    if not isinstance(text, str) or not text.strip():
        raise LorakitError(f"{record['_where']}: 'text' must be a non-empty string, got {text!r}")
    if isinstance(label, (dict, list)) or str(label).strip() == "":
        raise LorakitError(f"{record['_where']}: 'label' must be a string or a number, got {label!r}")
    return {"text": text, "label": str(label).strip(), "_where": record["_where"]}


def _lm_checker(first: dict):
    """The check for every record, from the shape of the first one."""
    shape = next((name for name, keys in LM_SHAPES.items() if all(k in first for k in keys)), None)
    if shape is None:
        raise LorakitError(f"{first['_where']} has keys {_keys_found(first)}; language-model data needs "
                           "'prompt' and 'completion', or 'messages', or 'text' on every line")
    keys = LM_SHAPES[shape]
    hint = f"the first line uses {' + '.join(keys)}, so every line must"

    def check(record: dict) -> dict:
        _require(record, keys, hint)
        if shape == "messages":
            return {"messages": _check_messages(record["messages"], record["_where"]), "_where": record["_where"]}
        for key in keys:
            if not isinstance(record[key], str) or (key != "prompt" and not record[key].strip()):
                raise LorakitError(f"{record['_where']}: {key!r} must be a non-empty string, got {record[key]!r}")
        return {**{key: record[key] for key in keys}, "_where": record["_where"]}

    return check


def _check_messages(messages, where: str) -> list[dict]:
    if isinstance(messages, str):  # a CSV cell holding JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise LorakitError(f"{where}: 'messages' is a string that is not JSON; give a list of "
                               '{"role": ..., "content": ...}') from None
    if not isinstance(messages, list) or not messages:
        raise LorakitError(f"{where}: 'messages' must be a non-empty list of "
                           '{"role": "user"|"assistant"|"system", "content": "..."}')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES \
                or not isinstance(message.get("content"), str):
            raise LorakitError(f"{where}: messages[{i}] is {message!r}; each message needs a 'role' in "
                               f"{list(CHAT_ROLES)} and a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise LorakitError(f"{where}: 'messages' has no assistant turn, so there is nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
