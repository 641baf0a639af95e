"""Reading an adapter's files from under the adapter root, and nowhere else.

Checking the folder is not enough: a folder inside the root may hold files that are
symlinks to files outside it. :func:`copy_confined` resolves every file before it is
read, refuses any that leads outside the root or is not a regular file, opens the
resolved path without following a symlink (``O_NOFOLLOW``, and ``O_NONBLOCK`` so a FIFO
cannot hang the server), checks again what the open descriptor points to (Linux'
``/proc/self/fd``, so a link swapped in between cannot lead outside), and copies the
bytes into a private folder. Loading then reads only that copy, through
:mod:`lorakit.io` as any other adapter.

Messages name files by their place under the root (``task0/adapter_model.safetensors``),
never by an absolute server path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lorakit.errors import LorakitError


class PathForbidden(LorakitError):
    """A path leads outside the adapter root (HTTP 403)."""


def shown(path: Path, root: Path) -> str:
    """``path`` as a client may see it: relative to ``root`` (``"."`` for the root itself)."""
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return path.name or "."


def resolve_under(root: Path, path: str | Path, what: str, as_shown: str | None = None) -> Path:
    """The real path of ``path`` (relative paths start at ``root``), which must lie under ``root``.

    Messages call it ``what`` followed by ``as_shown`` (default: ``path`` as given, which
    is the client's own words).

    Raises:
        PathForbidden: it resolves outside the root.
        LorakitError: the path is unusable (a NUL byte, too long, a symlink loop).
    """
    text = str(path)
    named = f"{what} {as_shown}" if as_shown is not None else f"{what} {_short(text)!r}"
    if "\x00" in text:
        raise LorakitError(f"{what} contains a NUL byte; give a plain folder name under the adapter root")
    try:
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = root / candidate
        real = candidate.resolve()  # follows every symlink on the way
    except RuntimeError:  # Python < 3.13 reports a symlink loop so
        raise LorakitError(f"{named} is a symlink loop") from None
    except (OSError, ValueError) as err:
        raise LorakitError(f"{named} cannot be used: {_reason(err)}") from None
    if not real.is_relative_to(root):
        raise PathForbidden(f"{named} lies outside the adapter root")
    return real


def copy_confined(folder: Path, root: Path, names: tuple[str, ...], destination: Path) -> list[str]:
    """Copy the files ``names`` of ``folder`` that exist into ``destination``, each read only
    after checking it lies under ``root``. Returns the names copied.

    Raises:
        PathForbidden: a file is (a link to) something outside the root.
        LorakitError: a file is not a regular file, or cannot be read.
    """
    copied = []
    for name in names:
        link = folder / name
        if not os.path.lexists(link):
            continue
        where = shown(link, root)
        real = resolve_under(root, link, "adapter file", where)
        (destination / name).write_bytes(_read_checked(real, root, where))
        copied.append(name)
    return copied


def _read_checked(real: Path, root: Path, where: str) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as err:
        raise LorakitError(f"adapter file {where} cannot be opened: {_reason(err)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LorakitError(f"adapter file {where} is not a regular file")
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.is_symlink():  # Linux: what the descriptor really points to
            target = Path(os.readlink(opened))
            if not target.is_relative_to(root):
                raise PathForbidden(f"adapter file {where} lies outside the adapter root")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as err:
        raise LorakitError(f"adapter file {where} cannot be read: {_reason(err)}") from None
    finally:
        os.close(fd)


def _reason(err: Exception) -> str:
    """The error without the path it may carry (``strerror`` for OS errors)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).split(":")[0]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
