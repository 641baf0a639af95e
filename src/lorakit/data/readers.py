"""Read a user's data file into records, checking it completely before training starts.

Files are read into raw records by :mod:`lorakit.data.files` (formats, compression, encodings);
folders saved by Hugging Face ``datasets`` by :mod:`lorakit.data.arrow`; files larger than
memory are streamed by :mod:`lorakit.data.stream`. All use the checks here.

- Columns named otherwise (``review`` for ``text``) are given as ``columns``:
  ``{"text": "review", "label": "rating"}`` (``--text-column review --label-column rating``).
- Classification (:func:`read_classification`): every record has ``text`` and ``label``, and a
  ``text_pair`` where the examples are pairs of texts (an entailment or paraphrase file): read
  from ``--text-column first,second``, or, in a file without a ``text`` column, from the pair
  columns GLUE's files use (:data:`PAIR_COLUMNS`: ``sentence1`` / ``sentence2``, ``premise`` /
  ``hypothesis``, ...), as transformers' GLUE example reads them; a file without a ``text``
  column that holds GLUE's single ``sentence`` column has it read as the text (SST-2, CoLA).
- Language modelling (:func:`read_language_modeling`), one of four shapes, the same on every line:
  ``prompt`` + ``completion`` (the prompt is masked out of the loss), Alpaca's ``instruction``
  + ``output`` with an optional ``input`` (read as a prompt, ``instruction`` and then ``input``
  after a blank line, and a completion), ``messages`` (a chat: a list of ``{"role", "content"}``,
  or ShareGPT's ``conversations`` of ``{"from", "value"}``: :mod:`lorakit.data.messages`;
  rendered with the tokenizer's chat template, only assistant turns trained), or plain
  ``text`` (every token trained).

Every record keeps where it came from in ``record["_where"]`` (``"data.jsonl line 7"``),
so later checks (an unknown label) can point at the line.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lorakit.data.compressed import format_suffix
from lorakit.data.files import read_file
from lorakit.data.labels import LabelWarning, merge_number_spellings
from lorakit.data.messages import SHAREGPT_KEY, check_messages
from lorakit.errors import LorakitError

CLASSIFY_KEYS = ("text", "label")
#: column pairs read as a pair of texts in a file without a "text" column
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                ("question", "sentence"), ("sentence_a", "sentence_b"))
#: the text column of GLUE's single-sentence files (SST-2, CoLA), read in a file without a "text" column
SINGLE_COLUMN = "sentence"
LM_SHAPES = {  # shape name -> the keys it needs
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),  # Alpaca's; an "input" beside them is optional
    "messages": ("messages",),
    "text": ("text",),
}


def read_records(path, kind: str, columns: dict | None = None) -> list[dict]:
    """Records of ``path`` in the shape ``kind`` needs: ``"classify"`` or ``"lm"``
    (:func:`read_classification`, :func:`read_language_modeling`)."""
    if kind not in READERS:
        raise LorakitError(f"kind must be one of {sorted(READERS)}, got {kind!r}")
    return READERS[kind](path, columns)


def read_classification(path, columns: dict | None = None, classes: bool = True) -> list[dict]:
    """``{"text", "label"}`` records of ``path`` (labels as strings; see :mod:`lorakit.data.labels`
    for labels that spell one number several ways: one class, where ``classes``), each with ``"_where"``.

    Raises:
        LorakitError: see :func:`read_file`; a record without a text or a label.
    """
    path = Path(path)
    if format_suffix(path) == ".txt":
        raise LorakitError(f"{path.name} is plain text, which holds no labels: classification reads a .jsonl, .csv, "
                           ".tsv, .json or .parquet file of texts and labels (plain text trains --task text)")
    return classification_records(read_file(path), path.name, columns, classes)


def read_texts(path, columns: dict | None = None) -> list[dict]:
    """The texts of ``path`` to classify, labelled or not: ``{"text", "_where", "_row"}`` records (``_row``: the
    row as read; a file of pairs, as :func:`read_classification` finds them, adds ``"text_pair"``); a ``.txt``
    file holds one text a line; a folder ``datasets`` saved (one ``Dataset``, or one split's folder) is read whole.

    Raises:
        LorakitError: see :func:`read_file`; a saved ``DatasetDict`` (which split?); a record without a text.
    """
    from lorakit.data.arrow import is_saved_dataset, read_saved_split, split_names

    if Path(path).is_dir() and is_saved_dataset(path):
        if split_names(path):
            raise LorakitError(f"{path} holds the splits {split_names(path)}; give one split's folder, such as "
                               f"{Path(path) / split_names(path)[-1]}")
        raw = read_saved_split(path)
    else:
        raw = read_file(path)
    columns = _pair_columns(raw[0] if raw else None, columns_of(raw[0] if raw else None, ("text",), columns))
    keys = ("text", "text_pair") if "text_pair" in (columns or {}) else ("text",)
    hint = "every line needs a text to classify (--text-column names another column; --text-column first,second " \
           "a pair of texts)"
    records = []
    for row in raw:
        _require(row, keys, hint, columns)
        record = with_columns(row, columns)
        for key in keys:
            if not isinstance(record[key], str) or not record[key].strip():
                raise LorakitError(f"{row['_where']}: {(columns or {}).get(key, key)!r} must be a non-empty string, "
                                   f"got {record[key]!r}")
        records.append({**{key: record[key] for key in keys}, "_where": row["_where"],
                        "_row": {k: v for k, v in row.items() if k != "_where"}})
    return records


def read_language_modeling(path, columns: dict | None = None) -> list[dict]:
    """``{"prompt", "completion"}``, ``{"messages"}`` or ``{"text"}`` records of ``path``
    (the shape of the first record, on every line), each with ``"_where"``.

    Raises:
        LorakitError: see :func:`read_file`; a record of another shape than the first.
    """
    return language_model_records(read_file(path), columns)


def classification_records(raw: list[dict], source: str, columns: dict | None = None,
                           classes: bool = True) -> list[dict]:
    """Raw rows (each with ``"_where"``) checked as classification records; ``classes``: labels spelling
    one number several ways are made one class (a regression's numbers are read as written)."""
    check = classify_checker(columns, raw[0] if raw else None)
    records = [check(record) for record in raw]
    return merge_number_spellings(records, source) if classes else records


def language_model_records(raw: list[dict], columns: dict | None = None) -> list[dict]:
    """Raw rows (each with ``"_where"``) checked as language-model records of one shape."""
    if not raw:
        return []
    check = lm_checker(raw[0], columns)
    return [check(record) for record in raw]


def columns_of(first: dict | None, keys, columns: dict | None) -> dict | None:
    """``columns`` with each standard key in ``keys`` that the first record lacks and the user did
    not name read from the one column named like it in another case (``Text``, ``LABEL``)."""
    found = dict(columns or {})
    for key in keys:
        if first is None or key in found or key in first:
            continue
        alike = [name for name in first if name != "_where" and str(name).strip().casefold() == key]
        if len(alike) == 1:
            found[key] = alike[0]
    return found or None


def with_columns(record: dict, columns: dict | None) -> dict:
    """``record`` with the user's column names (``columns``: standard name -> theirs) under
    the standard names; a standard name the record lacks stays missing."""
    if not columns:
        return record
    renamed = dict(record)
    for standard, theirs in columns.items():
        if theirs != standard:
            renamed.pop(standard, None)
            if theirs in record:
                renamed[standard] = record[theirs]
    return renamed


def _keys_found(record: dict) -> list[str]:
    return sorted(key for key in record if key != "_where")


def _require(record: dict, keys, what: str, columns: dict | None = None) -> None:
    """Refuse ``record`` (as read, before renaming) when it lacks one of the standard
    ``keys``, looked up under the user's name for it in ``columns``."""
    columns = columns or {}
    missing = [key for key in keys if _absent(record.get(columns.get(key, key)))]
    if missing:
        named = [f"{columns[key]!r} (--{key.removesuffix('_pair')}-column)" if columns.get(key, key) != key
                 else repr(key) for key in missing]
        empty = [columns.get(key, key) for key in missing if columns.get(key, key) in record]
        if empty:  # the key is there, its value is null or NaN
            raise LorakitError(f"{record['_where']} has no value for {empty[0]!r} (null or NaN); fill it in or "
                               "remove the line")
        others = [k for k in _keys_found(record) if k not in {columns.get(key, key) for key in keys}]
        if len(missing) == len(others) == 1:  # one column for one name: say the flag
            what = f"give --{missing[0]}-column {others[0]} if {others[0]!r} holds the {missing[0]}"
        raise LorakitError(f"{record['_where']} lacks {', '.join(named)}; it has keys "
                           f"{_keys_found(record)}; {what}")


def _absent(value) -> bool:
    """Whether a field holds nothing: missing, null, or a float NaN (pandas' empty cell, JSON's NaN)."""
    return value is None or (isinstance(value, float) and value != value)


def classify_checker(columns: dict | None = None, first: dict | None = None):
    """``raw row -> {"text", "label", "_where"}``, refusing a row without a text or a label; a
    column named like ``text`` or ``label`` in another case in the ``first`` row is read as it."""
    columns = _pair_columns(first, columns_of(first, CLASSIFY_KEYS, columns))
    keys = (*CLASSIFY_KEYS, "text_pair") if "text_pair" in (columns or {}) else CLASSIFY_KEYS
    named = {key: (columns or {}).get(key, key) for key in keys}
    if named["label"] in [named[key] for key in keys if key != "label"]:
        raise LorakitError(f"the text column {named['label']!r} is also the label column: the model would read the "
                           "answer; name the text with --text-column and the class with --label-column")
    if "," in named.get("text_pair", ""):
        raise LorakitError(f"--text-column {named['text']},{named['text_pair']} names more than two columns; a "
                           "classifier reads one text or a pair of texts")
    hint = "classification data needs 'text' and 'label' on every line (--text-column / --label-column " \
           "name other columns; --text-column first,second a pair of texts)"

    def check(record: dict) -> dict:
        _require(record, keys, hint, columns)
        record = with_columns(record, columns)
        text, label = record["text"], record["label"]
        for key in keys[2:]:  # the second text of a pair
            if not isinstance(record[key], str) or not record[key].strip():
                raise LorakitError(f"{record['_where']}: {columns[key]!r} must be a non-empty string, got "
                                   f"{record[key]!r}")
        if not isinstance(text, str) or not text.strip():
            raise LorakitError(f"{record['_where']}: 'text' must be a non-empty string, got {text!r}")
        if isinstance(label, str) and not label.strip():
            raise LorakitError(f"{record['_where']}: 'label' is empty; fill it in or remove the line")
        if isinstance(label, (dict, list)):
            raise LorakitError(f"{record['_where']}: 'label' must be a string or a number, got {label!r} "
                               "(one class per text: lorakit does not train multi-label classifiers)")
        pair = {"text_pair": record["text_pair"]} if len(keys) > 2 else {}
        return {"text": text, **pair, "label": str(label).strip(), "_where": record["_where"]}

    return check


def _pair_columns(first: dict | None, columns: dict | None) -> dict | None:
    """``columns`` with ``text`` and ``text_pair`` where the examples are pairs: ``--text-column a,b``
    (a name the file does not have whole), or a file without a text column holding one of
    :data:`PAIR_COLUMNS`."""
    columns = dict(columns or {})
    named = columns.get("text")
    if named and "," in named and (first is None or named not in first):
        text, pair = (name.strip() for name in named.split(",", 1))
        columns.update(text=text, text_pair=pair)
    elif named is None and first is not None and "text" not in first:
        found = next((p for p in PAIR_COLUMNS if all(name in first for name in p)), None)
        if found:
            columns.update(text=found[0], text_pair=found[1])
        elif SINGLE_COLUMN in first:
            columns.update(text=SINGLE_COLUMN)
    return columns or None


def lm_checker(first: dict, columns: dict | None = None):
    """The check for every language-model record, from the shape of the first one."""
    columns = columns_of(first, dict.fromkeys(k for keys in LM_SHAPES.values() for k in keys), columns)
    if "messages" not in (columns or {}) and "messages" not in first and SHAREGPT_KEY in first:
        columns = {**(columns or {}), "messages": SHAREGPT_KEY}  # ShareGPT's name for a chat's messages
    shape = next((name for name, keys in LM_SHAPES.items()
                   if all((columns or {}).get(k, k) in first for k in keys)), None)
    if shape is None:
        raise LorakitError(f"{first['_where']} has keys {_keys_found(first)}; language-model data needs "
                           "'prompt' and 'completion', 'instruction' and 'output', or 'messages' (ShareGPT's "
                           "'conversations'), or 'text' on "
                           "every line (--prompt-column, --completion-column, --messages-column, --text-column "
                           "name other columns)")
    keys = LM_SHAPES[shape]
    hint = f"the first line uses {' + '.join(keys)}, so every line must"
    label = next((k for k in first if str(k).casefold() == CLASSIFY_KEYS[1]), None)
    if shape == "text" and label is not None:  # a classification file given to a language-model task
        warnings.warn(f"{first['_where']}: the column {label!r} is not read; a language-model task trains on the "
                      f"text alone (to learn the labels, train --task classify)", LabelWarning, stacklevel=2)

    def check(record: dict) -> dict:
        _require(record, keys, hint, columns)
        record = with_columns(record, columns)
        if shape == "messages":
            return {"messages": check_messages(record["messages"], record["_where"]), "_where": record["_where"]}
        for key in keys:
            if not isinstance(record[key], str) or (key != "prompt" and not record[key].strip()):
                raise LorakitError(f"{record['_where']}: {key!r} must be a non-empty string, got {record[key]!r}")
        if shape == "instruction":
            return {**instruction_prompt(record), "_where": record["_where"]}
        return {**{key: record[key] for key in keys}, "_where": record["_where"]}

    return check


def instruction_prompt(record: dict) -> dict:
    """An Alpaca record (``instruction``, ``output``, optionally ``input``) as a prompt and a
    completion: the instruction, then the input after a blank line where there is one."""
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise LorakitError(f"{record['_where']}: 'input' must be a string, got {extra!r}")
    prompt = record["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    return {"prompt": prompt + "\n", "completion": record["output"]}


READERS = {"classify": read_classification, "lm": read_language_modeling}  # record shape -> reader
