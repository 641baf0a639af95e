"""Data files on disk, read into raw records as they are (each with where it came from).

Formats, chosen by the file's suffix (:data:`SUFFIXES`): ``.jsonl`` (one JSON object a line;
blank lines skipped), ``.json`` (an array of JSON objects, as Alpaca-style files are, or one
object a line as in ``.jsonl``), ``.csv`` and ``.tsv`` (a header row; commas between the fields
of a ``.csv``, or semicolons, tabs or bars where its header has no comma, as spreadsheets in many
locales write them; tabs in a ``.tsv``), ``.txt`` (plain text, a ``text`` record a line: the
text task's corpus), ``.parquet`` (read with pyarrow; a row is a record) and ``.xlsx`` (an Excel
workbook, read with openpyxl: the first worksheet, a header row, then a record a row). Any but
Parquet and Excel may be compressed whole (``train.jsonl.gz``, ``.bz2``, ``.xz``:
:mod:`lorakit.data.compressed`).
Text is UTF-8; a byte-order mark is allowed. What the records must hold is checked by
:mod:`lorakit.data.readers`.
"""

from __future__ import annotations

import csv
import json
import lzma
import warnings
from pathlib import Path

from lorakit.data.compressed import (COMPRESSIONS, check_compression, compression, format_suffix, open_text,
                                     read_bytes)
from lorakit.errors import LorakitError

ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is skipped


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
    if suffix in (".parquet", ".xlsx") and compression(path):
        raise LorakitError(f"{path.name}: a {suffix} file compresses itself; give the {suffix} file itself")
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


def _read_xlsx(path: Path) -> list[dict]:
    """The first worksheet of an Excel workbook: its first row that is not empty names the columns, each later
    row that is not empty is a record (a date cell as its ISO text; an empty cell as missing)."""
    import zipfile

    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError) as err:
        raise LorakitError(f"{path.name} is not an Excel workbook openpyxl can read ({err}); save it again as "
                           ".xlsx, or as .csv") from None
    try:
        if len(book.worksheets) > 1:
            warnings.warn(f"{path.name} has {len(book.worksheets)} worksheets; lorakit reads the first, "
                          f"{book.worksheets[0].title!r} (give the others as files of their own)", stacklevel=4)
        def empty(row) -> bool:
            return all(cell is None or (isinstance(cell, str) and not cell.strip()) for cell in row)

        rows = enumerate(book.worksheets[0].iter_rows(values_only=True), start=1)
        header = next(((number, row) for number, row in rows if not empty(row)), (0, ()))  # empty rows above it
        names = [None if name is None else str(name).strip() for name in header[1]]
        _no_duplicate_columns(path, [name for name in names if name])
        records = []
        for number, row in rows:
            if empty(row):
                continue
            record = {name: cell.isoformat() if hasattr(cell, "isoformat") else cell
                      for name, cell in zip(names, row) if name}
            records.append({**record, "_where": f"{path.name} row {number}"})
        return records
    finally:
        book.close()


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
        whole = _records_of_object(whole, path.name)
    if not isinstance(whole, list):
        raise LorakitError(f"{path.name} holds a JSON {_json_kind(whole)}, not an array of records")
    return [_an_object(item, f"{path.name} item {number}") for number, item in enumerate(whole, start=1)]


def _records_of_object(whole: dict, name: str) -> list:
    """The records one JSON object holds, in the two shapes Hugging Face ``datasets`` reads too:
    columns (``{"text": [...], "label": [...]}``, lists of one length, as pandas' ``to_dict("list")``
    writes) or the records under its one key (``{"data": [{...}, ...]}``; ``datasets``' ``field``)."""
    values = list(whole.values())
    if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
        if len(values) == 1 and all(isinstance(item, dict) for item in values[0]):
            return values[0]
        if len(values) > 1:
            return [dict(zip(whole, row)) for row in zip(*values)]
    raise LorakitError(f"{name} holds one JSON object (keys {sorted(whole)[:5]}), neither records nor columns of one "
                       'length; write [{"text": ..., "label": ...}, ...], one object a line, or {"text": [...], '
                       '"label": [...]}')


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
               ".parquet": _read_parquet, ".txt": _read_txt, ".xlsx": _read_xlsx}  # the formats lorakit reads
SUFFIXES = tuple(READ_SUFFIX)
FORMATS = ", ".join(SUFFIXES[:-1]) + " or " + SUFFIXES[-1]  # ".jsonl, .json, ..., .txt or .xlsx", for messages
