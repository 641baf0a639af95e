"""Read a user's data file into records, checking it completely before training starts.

Formats (chosen by the file's suffix):

- ``.jsonl`` (one JSON object a line; blank lines skipped), ``.json`` (an array of JSON
  objects, as Alpaca-style files are, or one object a line as in ``.jsonl``), ``.csv`` and
  ``.tsv`` (a header row; commas between the fields of a ``.csv``, or semicolons, tabs or bars
  where its header has no comma, as spreadsheets in many locales write them; tabs in a ``.tsv``),
  ``.txt`` (plain text, a ``text`` record a line: the text task's corpus) and ``.parquet`` (read with pyarrow;
  a row is a record); any but Parquet may be compressed whole (``train.jsonl.gz``, ``.bz2``, ``.xz``:
  :mod:`lorakit.data.compressed`). Folders saved by Hugging Face
  ``datasets`` are read by :mod:`lorakit.data.arrow`; files larger than memory are
  streamed by :mod:`lorakit.data.stream`. Both use the checks here.
- Columns named otherwise (``review`` for ``text``) are given as ``columns``:
  ``{"text": "review", "label": "rating"}`` (``--text-column review --label-column rating``).
- Classification (:func:`read_classification`): every record has ``text`` and ``label``.
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

import csv
import json
import lzma
from pathlib import Path

from lorakit.data.compressed import (COMPRESSIONS, check_compression, compression, format_suffix, open_text,
                                     read_bytes)
from lorakit.data.labels import merge_number_spellings
from lorakit.data.messages import SHAREGPT_KEY, check_messages
from lorakit.errors import LorakitError

ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is skipped
CLASSIFY_KEYS = ("text", "label")
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


def read_classification(path, columns: dict | None = None) -> list[dict]:
    """``{"text", "label"}`` records of ``path`` (labels as strings; see :mod:`lorakit.data.labels`
    for labels that spell one number several ways), each with ``"_where"``.

    Raises:
        LorakitError: see :func:`read_file`; a record without a text or a label.
    """
    path = Path(path)
    if format_suffix(path) == ".txt":
        raise LorakitError(f"{path.name} is plain text, which holds no labels: classification reads a .jsonl, .csv, "
                           ".tsv, .json or .parquet file of texts and labels (plain text trains --task text)")
    return classification_records(read_file(path), path.name, columns)


def read_language_modeling(path, columns: dict | None = None) -> list[dict]:
    """``{"prompt", "completion"}``, ``{"messages"}`` or ``{"text"}`` records of ``path``
    (the shape of the first record, on every line), each with ``"_where"``.

    Raises:
        LorakitError: see :func:`read_file`; a record of another shape than the first.
    """
    return language_model_records(read_file(path), columns)


def classification_records(raw: list[dict], source: str, columns: dict | None = None) -> list[dict]:
    """Raw rows (each with ``"_where"``) checked as classification records."""
    check = classify_checker(columns)
    return merge_number_spellings([check(record) for record in raw], source)


def language_model_records(raw: list[dict], columns: dict | None = None) -> list[dict]:
    """Raw rows (each with ``"_where"``) checked as language-model records of one shape."""
    if not raw:
        return []
    check = lm_checker(raw[0], columns)
    return [check(record) for record in raw]


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


def read_file(path) -> list[dict]:
    """The records of a data file (one of :data:`SUFFIXES`) as they are, each with
    ``"_where"`` (``"data.jsonl line 7"``, ``"data.json item 7"``, ``"data.parquet row 7"``).
    Text is UTF-8 (a byte-order mark is allowed).

    Raises:
        LorakitError: the file is missing, empty, not UTF-8, has an unknown suffix, or a
            line does not parse (its number and column are given).
    """
    path = Path(path)
    if not path.exists():
        raise LorakitError(f"data file {path} does not exist; give a {FORMATS} file")
    if path.is_dir():
        raise LorakitError(f"data path {path} is a folder; give a {FORMATS} file")
    check_compression(path)
    suffix = format_suffix(path)
    if suffix not in SUFFIXES:
        raise LorakitError(f"data file {path} has suffix {suffix!r}; lorakit reads {', '.join(SUFFIXES)} "
                           f"(each may be compressed: {', '.join(COMPRESSIONS)})")
    if suffix == ".parquet" and compression(path):
        raise LorakitError(f"{path.name}: Parquet compresses its own pages; give the .parquet file itself")
    try:
        raw = READ_SUFFIX[suffix](path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except (OSError, EOFError, lzma.LZMAError) as err:
        if not compression(path):
            raise
        raise LorakitError(f"{path.name} does not decompress as {compression(path)} ({err}); is it whole, "
                           "and compressed as its name says?") from None
    if not raw:
        raise LorakitError(f"data file {path} holds no records; add at least one line of data")
    return raw


def file_fingerprint(spec: str) -> str | None:
    """A short fingerprint of data file ``spec`` (its size and a hash of its first and last
    MiB), to tell later whether the file changed; None for ``"default"`` or a folder, whose
    splits are fixed."""
    import hashlib

    path = Path(spec)
    if spec == "default" or not path.is_file():
        return None
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(size - (1 << 20))
        digest.update(handle.read(1 << 20))
    return f"{size}:{digest.hexdigest()[:16]}"


def parquet_file(path: Path):
    """``pyarrow.parquet.ParquetFile`` of ``path``, or LorakitError when it is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise LorakitError(f"{path.name} does not read as Parquet ({err}); give a Parquet file written by "
                           "pandas, pyarrow or polars, or a .jsonl/.csv file") from None


def _read_parquet(path: Path) -> list[dict]:
    table = parquet_file(path).read()
    _no_duplicate_columns(path, table.column_names)
    rows = table.to_pylist()
    for number, row in enumerate(rows, start=1):
        row["_where"] = f"{path.name} row {number}"
    return rows


def _no_duplicate_columns(path: Path, names) -> None:
    """Refuse a header naming a column twice (which of the two is meant cannot be known)."""
    seen, twice = set(), []
    for name in names or ():
        if name in seen and name not in twice:
            twice.append(name)
        seen.add(name)
    if twice:
        raise LorakitError(f"{path.name} names the column {twice[0]!r} twice; rename or remove one of them")


def _not_utf8(path: Path) -> LorakitError:
    """The error for a file that is not UTF-8, naming the first bad line and byte."""
    data = read_bytes(path)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return LorakitError(f"{path.name} is UTF-16 text (it starts with a UTF-16 byte-order mark); lorakit reads "
                            f"UTF-8: save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8 {path.name}) and give that file")
    try:
        data.decode(ENCODING)
        where = ""
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        where = f": line {line} holds the byte 0x{data[err.start]:02x}, which is not UTF-8"
    return LorakitError(f"{path.name} is not UTF-8 text{where} (Latin-1 or Windows-1252, perhaps); lorakit reads "
                        f"UTF-8: save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name}) and give that file")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open_text(path, ENCODING) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                at = "the end of the line" if err.pos >= len(line.rstrip()) else f"column {err.pos + 1}"
                raise LorakitError(f"{where} is not valid JSON ({err.msg} at {at}); "
                                   "each line must be one JSON object") from None
            records.append(_an_object(record, where))
    return records


def _read_txt(path: Path) -> list[dict]:
    """Plain text, one example a line (blank lines skipped), as ``{"text": line}``: the text task's
    corpus as Hugging Face ``datasets``' "text" loader reads it."""
    with open_text(path, ENCODING) as handle:
        return [{"text": line.rstrip("\r\n"), "_where": f"{path.name} line {number}"}
                for number, line in enumerate(handle, start=1) if line.strip()]


def _an_object(record, where: str) -> dict:
    """``record`` with ``"_where"``, or LorakitError when it is not a JSON object."""
    if not isinstance(record, dict):
        raise LorakitError(f"{where} holds a JSON {_json_kind(record)}, not a JSON object like "
                           '{"text": ..., "label": ...}')
    record["_where"] = where
    return record


def _json_kind(value) -> str:
    """What JSON calls the kind of ``value``: array, number, string, boolean or null."""
    return {list: "array", int: "number", float: "number", str: "string", bool: "boolean"}.get(type(value), "null")


def _read_json(path: Path) -> list[dict]:
    """A JSON array of objects (``[{"text": ..., "label": ...}, ...]``), or JSON lines in a
    ``.json`` file (read as ``.jsonl``)."""
    with open_text(path, ENCODING) as handle:
        text = handle.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object a line, as in .jsonl
            return _read_jsonl(path)
        raise LorakitError(f"{path.name} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                           "a .json file holds an array of objects or one object a line") from None
    if isinstance(whole, dict):
        if not whole:
            return []
        raise LorakitError(f"{path.name} holds one JSON object (keys {sorted(whole)[:5]}), not an array of records; "
                           'write [{"text": ..., "label": ...}, ...] or one object a line')
    if not isinstance(whole, list):
        raise LorakitError(f"{path.name} holds a JSON {_json_kind(whole)}, not an array of records")
    return [_an_object(item, f"{path.name} item {number}") for number, item in enumerate(whole, start=1)]


def _read_tsv(path: Path) -> list[dict]:
    # Tab-separated values have no quoting: a field holds no tab or line break, and a quote
    # is text ('"so-called" ...'), so one line is one record whatever quotes it holds.
    return _read_csv(path, delimiter="\t", quoting=csv.QUOTE_NONE)


def _read_csv(path: Path, delimiter: str | None = None, quoting: int = csv.QUOTE_MINIMAL) -> list[dict]:
    with open_text(path, ENCODING, newline="") as handle:
        if delimiter is None:  # what the header is split by: commas, else what a spreadsheet wrote
            header = handle.readline()
            delimiter = next((d for d in (",", ";", "\t", "|") if d in header), ",")
            handle.seek(0)
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        try:
            _no_duplicate_columns(path, reader.fieldnames)
            rows = []
            for row in reader:
                if None in row:
                    what = {"\t": "tabs", ";": "semicolons", "|": "bars"}.get(delimiter, "commas")
                    raise LorakitError(f"{path.name} line {reader.line_num} has more fields than the header "
                                       f"{reader.fieldnames}; quote values that contain {what}")
                if not any((value or "").strip() for value in row.values()):
                    continue
                row["_where"] = f"{path.name} line {reader.line_num}"
                rows.append(row)
        except csv.Error as err:
            raise LorakitError(f"{path.name} line {reader.line_num} does not parse as CSV ({err})") from None
    return rows


READ_SUFFIX = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_tsv,
               ".parquet": _read_parquet, ".txt": _read_txt}  # the formats lorakit reads, by suffix
SUFFIXES = tuple(READ_SUFFIX)
FORMATS = ", ".join(SUFFIXES[:-1]) + " or " + SUFFIXES[-1]  # ".jsonl, .json, .csv, .tsv, .parquet or .txt", for messages


def _keys_found(record: dict) -> list[str]:
    return sorted(key for key in record if key != "_where")


def _require(record: dict, keys, what: str, columns: dict | None = None) -> None:
    """Refuse ``record`` (as read, before renaming) when it lacks one of the standard
    ``keys``, looked up under the user's name for it in ``columns``."""
    columns = columns or {}
    missing = [key for key in keys if _absent(record.get(columns.get(key, key)))]
    if missing:
        named = [f"{columns[key]!r} (--{key}-column)" if columns.get(key, key) != key else repr(key)
                 for key in missing]
        empty = [columns.get(key, key) for key in missing if columns.get(key, key) in record]
        if empty:  # the key is there, its value is null or NaN
            raise LorakitError(f"{record['_where']} has no value for {empty[0]!r} (null or NaN); fill it in or "
                               "remove the line")
        raise LorakitError(f"{record['_where']} lacks {', '.join(named)}; it has keys "
                           f"{_keys_found(record)}; {what}")


def _absent(value) -> bool:
    """Whether a field holds nothing: missing, null, or a float NaN (pandas' empty cell, JSON's NaN)."""
    return value is None or (isinstance(value, float) and value != value)


def classify_checker(columns: dict | None = None):
    """``raw row -> {"text", "label", "_where"}``, refusing a row without a text or a label."""
    hint = "classification data needs 'text' and 'label' on every line (--text-column / --label-column " \
           "name other columns)"

    def check(record: dict) -> dict:
        _require(record, CLASSIFY_KEYS, hint, columns)
        record = with_columns(record, columns)
        text, label = record["text"], record["label"]
        if not isinstance(text, str) or not text.strip():
            raise LorakitError(f"{record['_where']}: 'text' must be a non-empty string, got {text!r}")
        if isinstance(label, str) and not label.strip():
            raise LorakitError(f"{record['_where']}: 'label' is empty; fill it in or remove the line")
        if isinstance(label, (dict, list)):
            raise LorakitError(f"{record['_where']}: 'label' must be a string or a number, got {label!r} "
                               "(one class per text: lorakit does not train multi-label classifiers)")
        return {"text": text, "label": str(label).strip(), "_where": record["_where"]}

    return check


def lm_checker(first: dict, columns: dict | None = None):
    """The check for every language-model record, from the shape of the first one."""
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
