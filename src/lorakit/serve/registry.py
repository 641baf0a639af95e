"""Which adapters the server knows, which are resident in the model, and loading them.

An adapter is *registered* (a name and a folder on disk) and, while it is needed,
*resident* (its A and B attached to the model). At most ``max_loaded`` adapters are
resident; when another one is needed the least recently used one that no running
request holds is unloaded, and it is loaded again from disk the next time it is asked
for. Seeds 002/004: "all you require is one foundational model that can exchange
matrices".

Public names are users' words (``[A-Za-z0-9._-]{1,64}``); inside the model every load
gets a fresh slot name (``serve<n>``), so an adapter removed and re-added under the same
name while old requests still run on the old weights never collides with itself.

Reading (``names``, ``describe``) is safe from any thread; everything that touches the
model (``register``, ``acquire``, ``release``, ``unregister``) runs on the engine thread.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError

BASE = "base"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class UnknownAdapter(LorakitError):
    """A request named an adapter the server does not know (HTTP 404)."""


class AdapterConflict(LorakitError):
    """An adapter name is already taken (HTTP 409)."""


class AdapterForbidden(LorakitError):
    """An adapter path lies outside the adapter root, or none was configured (HTTP 403)."""


class AdapterLoadError(LorakitError):
    """An adapter's files could not be loaded into the model (HTTP 400)."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise naming it."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise LorakitError(f"adapter name {name!r} is invalid: use 1 to 64 of the characters A-Z a-z 0-9 . _ -")
    if name == BASE:
        raise AdapterConflict(f"adapter name {name!r} is reserved for the base model; choose another name")
    return name


@dataclass(eq=False)
class AdapterEntry:
    """One registered adapter. ``slot`` is its name inside the model while resident."""

    name: str
    path: Path
    slot: str | None = None
    pins: int = 0  # running requests using it
    removed: bool = False  # unregistered; unloaded as soon as no request holds it
    loads: int = 0
    last_load_s: float | None = None


class AdapterRegistry:
    """Adapter names -> folders, and the LRU set of resident adapters.

    Args:
        model: the base model the adapters attach to.
        adapter_root: folders of adapters loaded over HTTP must lie under it (symlinks
            resolved); None refuses loading over HTTP.
        max_loaded: most adapters resident at once (>= 1).
    """

    def __init__(self, model, adapter_root: str | Path | None = None, max_loaded: int = 8):
        if max_loaded < 1:
            raise LorakitError(f"--max-loaded must be at least 1, got {max_loaded}")
        self.model = model
        self.adapter_root = Path(adapter_root).resolve(strict=True) if adapter_root else None
        self.max_loaded = max_loaded
        self._entries: dict[str, AdapterEntry] = {}
        self._resident: OrderedDict[str, AdapterEntry] = OrderedDict()  # slot -> entry, LRU first
        self._slots = 0
        self._lock = threading.Lock()

    # ---- reading, from any thread -------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def describe(self) -> list[dict]:
        """One dict per registered adapter: name, path, resident, loads."""
        with self._lock:
            return [
                {"name": e.name, "path": str(e.path), "resident": e.slot is not None, "loads": e.loads}
                for e in sorted(self._entries.values(), key=lambda e: e.name)
            ]

    def resident_count(self) -> int:
        with self._lock:
            return len(self._resident)

    def unknown(self, name: str) -> UnknownAdapter:
        """The error for a name nobody registered, listing what is available."""
        available = ", ".join([BASE, *self.names()])
        return UnknownAdapter(f"model {name!r} not found; available: {available}")

    def check_known(self, name: str) -> None:
        if name != BASE and name not in self._entries:
            raise self.unknown(name)

    def resolve_path(self, path: str | Path, *, trusted: bool = False) -> Path:
        """The real folder for ``path``, which must lie under the adapter root.

        Relative paths are taken from the root. ``trusted`` paths (given on the command
        line with no root configured) may lie anywhere.
        """
        if self.adapter_root is None:
            if not trusted:
                raise AdapterForbidden("this server loads no adapters over HTTP: start it with --adapter-root DIR")
            real = Path(path).expanduser().resolve()
        else:
            candidate = Path(path).expanduser()
            if not candidate.is_absolute():
                candidate = self.adapter_root / candidate
            real = candidate.resolve()  # follows symlinks, so a link cannot lead outside
            if not real.is_relative_to(self.adapter_root):
                raise AdapterForbidden(f"adapter path {str(path)!r} lies outside the adapter root {self.adapter_root}")
        if not real.is_dir():
            raise LorakitError(f"adapter path {str(path)!r} is not a folder")
        if not (real / "adapter_config.json").is_file():
            raise LorakitError(f"adapter path {str(path)!r} holds no adapter_config.json")
        return real

    # ---- changing, on the engine thread -------------------------------------------
    def register(self, name: str, path: str | Path, *, trusted: bool = False, load: bool = True) -> AdapterEntry:
        """Add an adapter; with ``load`` it is loaded now (when a slot can be freed), so a
        broken file is reported at once and never registered."""
        check_name(name)
        with self._lock:
            if name in self._entries:
                raise AdapterConflict(f"adapter {name!r} is already loaded from {self._entries[name].path}; "
                                      f"DELETE /v1/adapters/{name} first")
        entry = AdapterEntry(name=name, path=self.resolve_path(path, trusted=trusted))
        if load and self._make_room():
            self._load(entry)
        else:
            from lorakit.io import read_adapter

            try:
                read_adapter(entry.path)
            except Exception as err:  # noqa: BLE001 - any unreadable file is the user's error
                raise AdapterLoadError(f"adapter {name!r} from {entry.path} cannot be read: {err}") from err
        with self._lock:
            self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Forget ``name``; requests already holding it finish on its weights first."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise self.unknown(name)
        entry.removed = True
        if entry.pins == 0:
            self._unload(entry)

    def acquire(self, name: str) -> AdapterEntry | None:
        """Pin ``name`` for one request, loading it if needed.

        Returns None when it is not resident and every resident adapter is pinned (the
        request waits). Raises :class:`UnknownAdapter` or :class:`AdapterLoadError`.
        """
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise self.unknown(name)
        if entry.slot is None:
            if not self._make_room():
                return None
            self._load(entry)
        with self._lock:
            self._resident.move_to_end(entry.slot)
        entry.pins += 1
        return entry

    def release(self, entry: AdapterEntry) -> None:
        """Unpin after a request finished; a removed adapter leaves the model now."""
        entry.pins -= 1
        if entry.pins == 0 and entry.removed:
            self._unload(entry)

    def _make_room(self) -> bool:
        """Unload least recently used unpinned adapters until one more fits."""
        while len(self._resident) >= self.max_loaded:
            victim = next((e for e in self._resident.values() if e.pins == 0), None)
            if victim is None:
                return False
            self._unload(victim)
        return True

    def _load(self, entry: AdapterEntry) -> None:
        from lorakit.io import load_adapter

        self._slots += 1
        slot = f"serve{self._slots}"
        start = time.perf_counter()
        try:
            load_adapter(self.model, entry.path, slot, activate=False)
        except Exception as err:  # noqa: BLE001 - reported to the client; the server goes on
            raise AdapterLoadError(f"adapter {entry.name!r} from {entry.path} failed to load: {err}") from err
        entry.last_load_s = time.perf_counter() - start
        entry.loads += 1
        entry.slot = slot
        with self._lock:
            self._resident[slot] = entry

    def _unload(self, entry: AdapterEntry) -> None:
        if entry.slot is None:
            return
        from lorakit.model import delete_adapter

        with self._lock:
            self._resident.pop(entry.slot, None)
        delete_adapter(self.model, entry.slot)
        entry.slot = None
