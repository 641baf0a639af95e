"""Data files compressed whole: ``train.jsonl.gz``, ``reviews.csv.bz2``, ``corpus.txt.xz``.

A file whose name ends in a compression suffix (:data:`COMPRESSIONS`) is read as the format
named before it, decompressed as it is read (Python's own ``gzip``, ``bz2`` and ``lzma``), as
Hugging Face ``datasets`` and pandas read such files. Such a file is read whole, not streamed
(a compressed stream cannot be entered at a record's byte offset). Parquet compresses its
own pages, so a compressed Parquet file is refused.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

from lorakit.errors import LorakitError

COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # suffix -> opener of a binary file
NOT_READ = (".zst", ".zip", ".7z", ".lz4")  # compressions named in the message that refuses them


def compression(path) -> str | None:
    """The compression suffix of ``path`` (``".gz"``), or None for a file stored plainly."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def format_suffix(path) -> str:
    """The suffix naming the format of ``path``'s contents: ``".jsonl"`` for ``d.jsonl`` and
    for ``d.jsonl.gz``."""
    path = Path(path)
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix in COMPRESSIONS else suffix


def check_compression(path) -> None:
    """Refuse a file compressed in a way lorakit does not read (``.zst``, ``.zip``...), in one line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in NOT_READ:
        raise LorakitError(f"{path.name} is compressed with {suffix}, which lorakit does not read; decompress it, "
                           f"or compress it with gzip, bzip2 or xz ({', '.join(COMPRESSIONS)})")


def stem(path) -> str:
    """The name without its format and compression suffixes: ``train`` for ``train.csv.gz``."""
    path = Path(path)
    return Path(path.stem).stem if compression(path) else path.stem


def open_text(path, encoding: str, newline: str | None = None):
    """``path`` opened for reading text, decompressed as it is read where it is compressed."""
    opener = COMPRESSIONS.get(Path(path).suffix.lower())
    if opener is None:
        return open(path, encoding=encoding, newline=newline)
    return opener(path, "rt", encoding=encoding, newline=newline)


def read_bytes(path) -> bytes:
    """The contents of ``path``, decompressed."""
    opener = COMPRESSIONS.get(Path(path).suffix.lower())
    if opener is None:
        return Path(path).read_bytes()
    with opener(path, "rb") as handle:
        return handle.read()
