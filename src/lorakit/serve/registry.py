"""Which adapters the server knows, which are resident in the model, and loading them.

An adapter is *registered* (a name and a folder on disk) and, while it is needed,
*resident* (its A and B attached to the model). At most ``max_loaded`` adapters are
resident; when another one is needed the least recently used one that no running
request holds is unloaded, and it is loaded again from disk the next time it is asked
for. Seeds 002/004: "all you require is one foundational model that can exchange
matrices".

Public names are users' words (letters, digits and ``. _ - : / @ +``, up to 128, such
as vLLM's ``org/name``); inside the model every load gets a fresh slot name
(``serve<n>``), so an adapter removed and re-added under the same name while old
requests still run on the old weights never collides with itself. Messages speak of the
public name and of paths relative to the adapter root, never of slots or server paths.

With an adapter root, every file is read through :mod:`lorakit.serve.confine` (each one
resolved and checked to lie under the root). An adapter whose weights hold NaN or
infinity is refused at load. A classifier adapter's labels come from the
``lorakit_task.json`` that ``lorakit train`` wrote beside it, as ``lorakit predict`` reads them.

Reading (``names``, ``describe``) is safe from any thread; everything that touches the
model (``register``, ``acquire``, ``release``, ``unregister``) runs on the engine thread.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorakit.errors import LorakitError
from lorakit.serve.adapter_info import task_facts, trained_template
from lorakit.serve.confine import PathForbidden, copy_confined, resolve_under, shown

BASE = "base"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:/@+-]{0,127}")
FOLDER_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # a folder directly under the root


class UnknownAdapter(LorakitError):
    """A request named an adapter the server does not know (HTTP 404)."""


class AdapterConflict(LorakitError):
    """An adapter name is already taken (HTTP 409)."""


AdapterForbidden = PathForbidden  # an adapter path lies outside the adapter root, or none was configured (403)


class AdapterLoadError(LorakitError):
    """An adapter's files could not be loaded into the model (HTTP 400)."""


class MissingAdapter(LorakitError):
    """No adapter folder at the path given (HTTP 400; vLLM's route answers 404)."""


def short(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters, for echoing a client's value in a message."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise naming it."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise LorakitError(f"adapter name {short(str(name))!r} is invalid: use 1 to 128 of the characters "
                           "A-Z a-z 0-9 . _ - : / @ + (not starting with a punctuation mark)")
    if name == BASE:
        raise AdapterConflict(f"adapter name {name!r} is reserved for the base model; choose another name")
    return name


@dataclass(eq=False)
class AdapterEntry:
    """One registered adapter. ``slot`` is its name inside the model while resident."""

    name: str
    path: Path
    shown: str = ""  # the path as clients may see it (relative to the root)
    labels: list[str] | None = None  # class names of a classifier adapter, by index
    max_length: int | None = None  # tokens a classifier adapter's inputs are cut to, as in training
    pairs: bool = False  # a classifier of pairs of texts: each input "first<TAB>second"
    chat_template: str | None = None  # the chat template it was trained with, where it carries one
    slot: str | None = None
    pins: int = 0  # running requests using it
    removed: bool = False  # unregistered; unloaded as soon as no request holds it
    loads: int = 0
    last_load_s: float | None = None
    trusted: bool = False  # given on the command line: read in place, wherever it lies


class AdapterRegistry:
    """Adapter names -> folders, and the LRU set of resident adapters.

    Args:
        model: the base model the adapters attach to.
        adapter_root: folders of adapters loaded over HTTP must lie under it (symlinks
            resolved); None refuses loading over HTTP.
        max_loaded: most adapters resident at once (>= 1).
        load_on_demand: a name that is not registered but is a folder directly under the
            root is registered from it when asked for (:meth:`ensure`, :meth:`acquire`).
    """

    def __init__(self, model, adapter_root: str | Path | None = None, max_loaded: int = 8,
                 load_on_demand: bool = False):
        if max_loaded < 1:
            raise LorakitError(f"--max-loaded must be at least 1, got {max_loaded}")
        self.model = model
        self.adapter_root = _existing_root(adapter_root) if adapter_root else None
        self.max_loaded = max_loaded
        if load_on_demand and self.adapter_root is None:
            raise LorakitError("--load-on-demand needs --adapter-root DIR: adapters are loaded from folders under it")
        self.load_on_demand = load_on_demand
        self.on_load: Callable[[AdapterEntry], None] | None = None  # told of each load (metrics)
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

    def knows(self, name: str) -> bool:
        """Whether an adapter is registered under ``name``."""
        return name in self._entries

    def is_resident(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.slot is not None

    def labels(self, name: str) -> list[str] | None:
        """The class names adapter ``name`` was trained with (None: the model's own)."""
        entry = self._entries.get(name)
        return entry.labels if entry is not None else None

    def chat_template(self, name: str) -> str | None:
        """The chat template adapter ``name`` was trained with (None: the server's)."""
        entry = self._entries.get(name)
        return entry.chat_template if entry is not None else None

    def unknown(self, name: str) -> UnknownAdapter:
        """The error for a name nobody registered, listing what is available."""
        available = ", ".join([BASE, *self.names()])
        return UnknownAdapter(f"model {short(name)!r} not found; available: {short(available, 400)}")

    def check_known(self, name: str) -> None:
        if name != BASE and name not in self._entries:
            raise self.unknown(name)

    def on_disk(self, name: str) -> bool:
        """Whether ``name`` is a folder directly under the adapter root (load on demand)."""
        if self.adapter_root is None or not FOLDER_PATTERN.fullmatch(name):
            return False
        try:
            return (self.adapter_root / name / "adapter_config.json").is_file()
        except OSError:
            return False

    def resolve_path(self, path: str | Path, *, trusted: bool = False) -> Path:
        """The real folder for ``path``, which must lie under the adapter root.

        Relative paths are taken from the root. ``trusted`` paths (given on the command
        line) may lie anywhere: taken from the current folder, else from the root.
        """
        if trusted:
            given = Path(path).expanduser()
            if not given.exists() and self.adapter_root is not None and (self.adapter_root / given).exists():
                given = self.adapter_root / given
            real = given.resolve()
        elif self.adapter_root is None:
            raise AdapterForbidden("this server loads no adapters over HTTP: start it with --adapter-root DIR")
        else:
            real = resolve_under(self.adapter_root, path, "adapter path")
        try:
            if not real.is_dir():
                raise MissingAdapter(f"adapter path {short(str(path))!r} is not a folder")
            if not (real / "adapter_config.json").is_file():
                raise MissingAdapter(f"adapter path {short(str(path))!r} holds no adapter_config.json")
        except OSError as err:
            raise LorakitError(f"adapter path {short(str(path))!r} cannot be used: {err.strerror}") from None
        return real

    # ---- changing, on the engine thread -------------------------------------------
    def register(self, name: str, path: str | Path, *, trusted: bool = False, load: bool = True,
                 replace: bool = False) -> AdapterEntry:
        """Add an adapter; with ``load`` it is loaded now (when a slot can be freed), so a
        broken file is reported at once and never registered. ``replace`` swaps a
        registered adapter of that name for the new files once they loaded (requests
        already running finish on the old weights); a failed load keeps the old one."""
        check_name(name)
        with self._lock:
            old = self._entries.get(name)
        if old is not None and not replace:
            raise AdapterConflict(f"adapter {name!r} is already loaded from {old.shown}; "
                                  f"DELETE /v1/adapters/{name} first")
        real = self.resolve_path(path, trusted=trusted)
        # clients see a path relative to the root; a command-line adapter without a root, its folder's name
        entry = AdapterEntry(name=name, path=real, shown=shown(real, self.adapter_root) if self.adapter_root else real.name,
                             trusted=trusted)
        if load:
            self._check_loadable(entry)  # before _make_room: a broken file must not evict another's adapter
        if load and self._make_room():
            self._load(entry)
        else:
            from lorakit.io import read_adapter

            with self._staged(entry) as folder:
                try:
                    read_adapter(folder)
                except Exception as err:  # noqa: BLE001 - any unreadable file is the user's error
                    raise AdapterLoadError(self._scrub(f"adapter {name!r} from {entry.shown} cannot be read: {err}",
                                                       entry, folder)) from None
                _read_facts(entry, folder)
        with self._lock:
            self._entries[name] = entry
        if old is not None:
            old.removed = True
            if old.pins == 0:
                self._unload(old)
        return entry

    def ensure(self, name: str) -> AdapterEntry:
        """Adapter ``name``, registered from the folder of that name under the root if it
        is not yet (load on demand; concurrent callers on the engine thread load it once).

        Raises:
            UnknownAdapter: no such folder directly under the root.
        """
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None:
            return entry
        if not (self.load_on_demand and self.on_disk(name)):
            raise self.unknown(name)
        return self.register(name, name, load=True)

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
        request waits). With load on demand, an adapter removed while its request waited is
        registered from its folder again, as a request arriving after the removal would be.
        Raises :class:`UnknownAdapter` or :class:`AdapterLoadError`.
        """
        entry = self.ensure(name)
        if entry.slot is None:
            self._check_loadable(entry)  # its files may have changed since: fail before evicting another
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

    def _check_loadable(self, entry: AdapterEntry) -> None:
        """Raise :class:`AdapterLoadError` when ``entry``'s files would not load onto the model
        (unreadable, not fitting, non-finite), changing nothing: checked before a resident
        adapter is evicted to make room for it."""
        import torch

        from lorakit.io import read_adapter_with_metadata
        from lorakit.peft_format import check_runnable
        from lorakit.peft_load import plan_load

        with self._staged(entry) as folder:
            try:
                config, tensors, metadata = read_adapter_with_metadata(folder)
                check_runnable(config.task_type, "it")
                plan_load(self.model, config, tensors, "check", folder, metadata)
            except Exception as err:  # noqa: BLE001 - reported to the client; the server goes on
                raise AdapterLoadError(self._scrub(f"adapter {entry.name!r} from {entry.shown} failed to load: {err}",
                                                   entry, folder)) from None
        bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if bad:
            raise AdapterLoadError(f"adapter {entry.name!r} from {entry.shown} holds NaN or infinite weights "
                                   f"({len(bad)} tensors, e.g. {bad[0]}); every answer through it would be broken: "
                                   "retrain or re-save it")

    def _load(self, entry: AdapterEntry) -> None:
        from lorakit.io import load_adapter

        self._slots += 1
        slot = f"serve{self._slots}"
        start = time.perf_counter()
        with self._staged(entry) as folder:
            try:
                load_adapter(self.model, folder, slot, activate=False)
            except Exception as err:  # noqa: BLE001 - reported to the client; the server goes on
                message = self._scrub(f"adapter {entry.name!r} from {entry.shown} failed to load: {err}", entry, folder)
                with self._lock:  # every slot named (this one, resident ones) by its adapter's name
                    names = {**{s: e.name for s, e in self._resident.items()}, slot: entry.name}
                raise AdapterLoadError(re.sub(r"\bserve\d+\b", lambda m: names.get(m[0], m[0]), message)) from None
            _read_facts(entry, folder)
        entry.last_load_s = time.perf_counter() - start
        entry.loads += 1
        entry.slot = slot
        with self._lock:
            self._resident[slot] = entry
        if self.on_load is not None:
            self.on_load(entry)

    @contextmanager
    def _staged(self, entry: AdapterEntry):
        """The folder to read ``entry`` from: with an adapter root, a private copy of its
        files, each checked to lie under the root; without one, the folder itself."""
        if self.adapter_root is None or entry.trusted:
            yield entry.path
            return
        from lorakit.chat_templates import FILE as TEMPLATE_FILE
        from lorakit.io import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
        from lorakit.run_folder import TASK_FILE

        with tempfile.TemporaryDirectory(prefix="lorakit-serve-") as tmp:
            names = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, TASK_FILE, TEMPLATE_FILE)
            copy_confined(entry.path, self.adapter_root, names, Path(tmp))
            yield Path(tmp)

    def _scrub(self, message: str, entry: AdapterEntry, folder: Path) -> str:
        """``message`` without absolute server paths: the staged copy and the real folder
        become the path as the client gave it."""
        for path in (str(folder), str(entry.path)):
            message = message.replace(path, entry.shown)
        if self.adapter_root is not None:
            message = message.replace(str(self.adapter_root), "<adapter root>")
        return message

    def _unload(self, entry: AdapterEntry) -> None:
        if entry.slot is None:
            return
        from lorakit.model import delete_adapter

        with self._lock:
            self._resident.pop(entry.slot, None)
        delete_adapter(self.model, entry.slot)
        entry.slot = None


def _read_facts(entry: AdapterEntry, folder: Path) -> None:
    """What ``entry``'s folder says beside its weights: class names, length, chat template."""
    entry.labels, entry.max_length, entry.pairs = task_facts(folder)
    entry.chat_template = trained_template(folder)


def _existing_root(path: str | Path) -> Path:
    try:
        root = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise LorakitError(f"--adapter-root {path} does not exist; create the folder or give an existing one") from None
    if not root.is_dir():
        raise LorakitError(f"--adapter-root {path} is not a folder; give the folder that holds the adapter folders")
    return root
