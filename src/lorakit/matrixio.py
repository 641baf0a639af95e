"""Read one matrix from a file: .npy, .npz, .csv/.txt, or .safetensors.

Used by ``lorakit approx`` and ``lorakit rank``; every problem with the file (missing,
unreadable, ragged, non-numeric, NaN/Inf, not 2-D, empty, missing key) is a
:class:`~lorakit.errors.LorakitError` naming the file and the value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorakit.errors import LorakitError
from lorakit.lowrank import as_matrix

__all__ = ["load_matrix", "parse_text_matrix"]

TEXT_SUFFIXES = (".csv", ".txt", ".tsv")


def load_matrix(path, key: str | None = None) -> torch.Tensor:
    """Load the 2-D matrix in ``path`` as a CPU tensor ``(m, n)``.

    Args:
        path: a ``.npy`` array; a ``.npz`` or ``.safetensors`` file (``key`` picks the
            array, and may be left out when the file holds exactly one); or a text file
            (``.csv``, ``.txt``, ``.tsv``) with one row per line, values separated by
            commas or whitespace, ``#`` comment lines and blank lines skipped.
        key: the array's name inside a ``.npz`` or ``.safetensors`` file.

    Returns:
        float32 and float64 data keep their dtype (numerical rank depends on it); text
        and integer data become float64; float16/bfloat16 become float32.
    """
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"matrix file {str(path)!r} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if key is not None and suffix not in (".npz", ".safetensors"):
        raise LorakitError(f"--key {key!r} applies to .npz and .safetensors files, not {path.name!r}")
    if suffix == ".npy":
        data = _load_npy(path)
    elif suffix == ".npz":
        data = _load_npz(path, key)
    elif suffix == ".safetensors":
        data = _load_safetensors(path, key)
    elif suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise LorakitError(f"cannot read {str(path)!r} as text: {err}") from None
        data = parse_text_matrix(text, source=str(path))
    else:
        raise LorakitError(
            f"cannot tell the format of {str(path)!r}; use .npy, .npz, .csv, .txt, .tsv or .safetensors"
        )
    name = str(path) if key is None else f"{key!r} in {str(path)!r}"
    return as_matrix(data, name)


def parse_text_matrix(text: str, source: str = "<text>") -> np.ndarray:
    """Parse rows of numbers (comma- or whitespace-separated) into a float64 ``(m, n)`` array."""
    rows: list[list[float]] = []
    first_line = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")] if "," in line else line.split()
        row = []
        for col, field in enumerate(fields, start=1):
            try:
                row.append(float(field))
            except ValueError:
                raise LorakitError(
                    f"{source} line {lineno}, column {col}: {field!r} is not a number"
                ) from None
        if rows and len(row) != len(rows[0]):
            raise LorakitError(
                f"{source} is ragged: line {lineno} has {len(row)} values but line {first_line} has "
                f"{len(rows[0])}; every row needs the same number of columns"
            )
        if not rows:
            first_line = lineno
        rows.append(row)
    if not rows:
        raise LorakitError(f"{source} holds no numbers; give one matrix row per line")
    return np.array(rows, dtype=np.float64)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise LorakitError(f"cannot read {str(path)!r} as a .npy array: {err}") from None


def _pick(keys: list[str], key: str | None, path: Path) -> str:
    shown = ", ".join(repr(k) for k in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
    if key is None:
        if len(keys) == 1:
            return keys[0]
        raise LorakitError(f"{str(path)!r} holds {len(keys)} arrays ({shown}); pick one with --key NAME")
    if key not in keys:
        raise LorakitError(f"{str(path)!r} has no array {key!r}; it holds {shown or 'none'}")
    return key


def _load_npz(path: Path, key: str | None) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive[_pick(list(archive.files), key, path)]
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, LorakitError):
            raise
        raise LorakitError(f"cannot read {str(path)!r} as a .npz archive: {err}") from None


def _load_safetensors(path: Path, key: str | None) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(_pick(sorted(f.keys()), key, path))
    except (SafetensorError, OSError) as err:
        raise LorakitError(f"cannot read {str(path)!r} as safetensors: {err}") from None
