"""The folder a training run writes (``lorakit train --out DIR``), and which files in it are lorakit's.

Layout of a run folder::

    DIR/lorakit_run.json          the marker: this is a lorakit run; the files of each saved result
    DIR/adapter/  (or model/)     the trained result (``Method.saved_name``), with lorakit_task.json
    DIR/state/last/               the checkpoint (lorakit.checkpoint); DIR/state/best.safetensors
    DIR/metrics.jsonl  DIR/curves.png  DIR/report.json  DIR/confusion.png (a classifier's)
    DIR/predictions.png  (a regression's)

Ownership, the rule a run follows before it writes anything:

- a new or empty folder becomes a run folder (the marker is written first);
- a folder holding the marker is an earlier run's and may be reused: lorakit replaces its
  own files there and keeps everything else (a user's notes beside or inside ``adapter/``);
- a folder lorakit did not write (no marker, and entries other than hidden ones such as
  ``.DS_Store``) is refused, unless the user says ``overwrite``: lorakit then writes its
  files there, replacing files of the same names only;
- nothing lorakit did not write is ever deleted: the saved result's folder is swapped in
  whole (:func:`lorakit.atomic.replace_folder`) and the entries of the previous one that
  the marker does not list as lorakit's are moved into the new one.

A folder written before the marker existed (it holds only the names above, and a
checkpoint or a report) counts as a run folder too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from lorakit import atomic
from lorakit.errors import LorakitError

MARKER = "lorakit_run.json"
TASK_FILE = "lorakit_task.json"  # in a saved result: how to load and use it again
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CONFUSION = "confusion.png"
SCATTER = "predictions.png"
REPORT = "report.json"
STATE = "state"


class RunFolder:
    """The run folder at ``root`` (see the module docstring); nothing is written on creation.

    Attributes:
        root: the folder (``--out``).
        metrics, curves, report, confusion, scatter: the paths of ``metrics.jsonl``, ``curves.png``,
            ``report.json``, ``confusion.png`` (a classifier's), ``predictions.png`` (a regression's).
        checkpoint: the checkpoint folder, ``state/last``.
        best: the best trainable weights so far, ``state/best.safetensors``.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.metrics = self.root / METRICS
        self.curves = self.root / CURVES
        self.confusion = self.root / CONFUSION
        self.scatter = self.root / SCATTER
        self.report = self.root / REPORT
        self.checkpoint = self.root / STATE / "last"
        self.best = self.root / STATE / "best.safetensors"

    @classmethod
    def claim(cls, root, overwrite: bool = False) -> "RunFolder":
        """The run folder at ``root``, checked against the ownership rule (writes nothing).

        Raises:
            LorakitError: ``root`` is a file, or a non-empty folder lorakit did not write
                and ``overwrite`` is False.
        """
        folder = cls(root)
        root = folder.root
        if root.exists() and not root.is_dir():
            raise LorakitError(f"--out {root} is a file; give a folder for the run")
        atomic.check_writable(root)
        if root.is_dir() and not overwrite and not folder.is_run() and _visible(root):
            held = sorted(p.name + ("/" if p.is_dir() else "") for p in _visible(root))
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise LorakitError(f"--out {root} is not empty and was not written by lorakit train (it holds {shown}); "
                               "give a new or empty folder, or add --overwrite to write the run's files there "
                               "(files of other names are kept)")
        return folder

    def mark(self) -> None:
        """Make the folder a run folder: create it and write the marker (kept if present)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MARKER).is_file():
            atomic.write_json(self.root / MARKER, {"written_by": "lorakit train", "saved": {}})

    def is_run(self) -> bool:
        """Whether the folder holds a run: the marker, or (written before the marker
        existed) only a run's names, with a checkpoint or a report."""
        if (self.root / MARKER).is_file():
            return True
        if not self.root.is_dir():
            return False
        names = {METRICS, CURVES, CONFUSION, SCATTER, REPORT, STATE}
        own = all(p.name in names or (p / TASK_FILE).is_file() for p in _visible(self.root))
        return own and (atomic.existing_folder(self.checkpoint) is not None or self.report.is_file())

    def has_checkpoint(self) -> bool:
        return atomic.existing_folder(self.checkpoint) is not None

    def saved_results(self) -> list[Path]:
        """The saved results (folders holding ``lorakit_task.json``) in the run folder."""
        if not self.root.is_dir():
            return []
        names = list(self._record()["saved"]) or sorted(p.name for p in self.root.iterdir() if p.is_dir())
        return [self.root / name for name in names if (self.root / name / TASK_FILE).is_file()]

    def save_result(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write a trained result as the folder ``name`` (``adapter``, ``model``).

        ``write(tmp)`` fills an empty temporary folder; it replaces the previous result
        at once. The previous result's files are discarded, other entries kept.
        """
        record = self._record()
        written: list[str] = []

        def fill(tmp: Path):
            write(tmp)
            written.extend(sorted(p.name for p in tmp.iterdir()))

        dest = atomic.replace_folder(self.root / name, fill, discard=record["saved"].get(name, ()))
        record["saved"][name] = written
        atomic.write_json(self.root / MARKER, record)
        return dest

    def _record(self) -> dict:
        try:
            record = json.loads((self.root / MARKER).read_text())
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        record.setdefault("written_by", "lorakit train")
        if not isinstance(record.get("saved"), dict):
            record["saved"] = {}
        return record


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` but hidden ones (``.DS_Store``; lorakit's own temporaries)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def trained_folder(path) -> Path:
    """The folder of a trained result: ``path`` itself when it holds ``lorakit_task.json``,
    or the saved result (``adapter/``, ``model/``) of the run folder ``path``.

    Raises:
        LorakitError: ``path`` does not exist, is a run folder with no (or several)
            saved results, or is neither.
    """
    path = Path(path)
    if not path.is_dir():
        raise LorakitError(f"{path} does not exist; give the --out folder of lorakit train, or the adapter/ "
                           "(model/) folder inside it" if not path.exists() else
                           f"{path} is a file; give the --out folder of lorakit train, or the adapter/ (model/) "
                           "folder inside it")
    if (path / TASK_FILE).is_file():
        return path
    run = RunFolder(path)
    results = run.saved_results()
    if len(results) == 1:
        return results[0]
    if len(results) > 1:
        raise LorakitError(f"run folder {path} holds several trained results ({', '.join(p.name for p in results)}); "
                           f"give one of them, e.g. {results[0]}")
    if run.is_run():
        raise LorakitError(f"run folder {path} holds no trained result yet (lorakit train saves one at its first "
                           f"evaluation); let the run reach it, or continue it with lorakit train --resume --out {path}")
    held = sorted(p.name for p in path.iterdir())
    raise LorakitError(f"{path} holds neither {TASK_FILE} nor a lorakit train run (it holds {held[:8]}); give the "
                       "--out folder of lorakit train, or the adapter/ (model/) folder inside it")


def adapter_folder(path) -> Path:
    """The folder to read an adapter from: the saved result when ``path`` is a run
    folder of lorakit train, else ``path`` itself (any adapter folder, PEFT's too).

    Raises:
        LorakitError: ``path`` is a run folder with no (or several) saved results.
    """
    path = Path(path)
    if path.is_dir() and not (path / TASK_FILE).is_file() and RunFolder(path).is_run():
        return trained_folder(path)
    return path
