"""Files and folders written atomically: a reader, or a crash, never sees half of one.

One recipe for every file lorakit writes (adapters, checkpoints, reports, figures): the
bytes go to a temporary file in the destination's folder, are flushed to disk
(``fsync``), made readable by others (``0644``: ``mkstemp`` makes them private), and
renamed over the destination with ``os.replace``; on any error the temporary file is
removed. A folder is written whole under a temporary name and swapped in
(:func:`replace_folder`).

This module sits at the bottom: it imports nothing of lorakit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

FILE_MODE = 0o644


@contextmanager
def writing(path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on leaving, move it into place.

    For writers that want a file name (``safetensors.torch.save_file``, ``savefig``)::

        with writing(out / "state.safetensors") as tmp:
            save_file(tensors, str(tmp))

    The temporary file is flushed to disk before the rename. If the block raises, it is
    removed and ``path`` is left as it was.

    Args:
        suffix: the temporary name's ending (some writers choose a format by it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with writing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, *, sort_keys: bool = True, default: Callable | None = None) -> Path:
    """Write ``obj`` as indented JSON (and a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n")


# ---------------------------------------------------------------- folders


def replace_folder(dest, write: Callable[[Path], None], discard: Iterable[str] = ()) -> Path:
    """Call ``write(tmp)`` to fill a fresh temporary folder, then swap it in as ``dest``.

    The previous ``dest`` is moved aside to ``.<name>.old`` and the new folder renamed
    into place; a crash at any moment leaves one whole version (:func:`existing_folder`
    finds the old one if the process dies between the two renames).

    Entries of the previous folder that the new one does not hold are moved into the new
    one, except those named in ``discard`` (files the caller wrote there before and no
    longer writes): nothing written by anyone else is ever deleted. If ``write`` raises,
    ``dest`` is left as it was.

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    discard = set(discard)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    old = _old(dest)
    _settle(dest, discard)  # a crash of an earlier call may have left .old behind
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    _sync_folder(dest.parent)
    _settle(dest, discard)
    return dest


def existing_folder(dest) -> Path | None:
    """``dest`` if it exists, else the previous version a crash left aside, else None."""
    dest = Path(dest)
    if dest.is_dir():
        return dest
    return _old(dest) if _old(dest).is_dir() else None


def _old(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def _settle(dest: Path, discard: set) -> None:
    """Finish what a swap left: restore ``.old`` if ``dest`` is missing; else move the
    entries of ``.old`` that ``dest`` lacks (and that are not in ``discard``) into
    ``dest``, then remove ``.old`` (what is left in it was replaced or discarded)."""
    old = _old(dest)
    if not old.is_dir():
        return
    if not dest.exists():
        os.replace(old, dest)
        return
    for entry in old.iterdir():
        if entry.name not in discard and not (dest / entry.name).exists():
            os.replace(entry, dest / entry.name)
    shutil.rmtree(old)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path, flag: str = "--out") -> None:
    """Refuse a folder path that cannot be written: under a file, on a read-only file system,
    or without permission (probed with a temporary file in its nearest existing folder, then
    removed). ``flag`` names the setting in the message."""
    from lorakit.errors import LorakitError

    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LorakitError(f"{flag} {path} lies under {existing}, which is a file; give a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise LorakitError(f"{flag} {path} cannot be written ({err.strerror or err} in {existing}); give a folder "
                           "you can write to") from None


def check_new_folder(path, what: str, flag: str = "--out") -> Path:
    """``path`` as a folder a command may create: new or empty, and writable; else one
    LorakitError saying so (nothing of the user's is ever written over)."""
    from lorakit.errors import LorakitError

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        kind = "a file" if not path.is_dir() else "not an empty folder"
        raise LorakitError(f"{flag} {path} is {kind}; give a new folder for {what}")
    check_writable(path, flag)
    return path
