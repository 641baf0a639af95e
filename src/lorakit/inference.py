"""Using what ``lorakit train`` saved: evaluate it, classify texts, generate answers.

A saved adapter folder (or, for ``--method full``, a whole model folder) holds
``lorakit_task.json``: the task, the base model, the labels and the max length; a run
folder (``lorakit train --out``) may be given in its place, standing for its saved result
(:func:`lorakit.run_folder.trained_folder`). From that, :func:`load_trained` rebuilds
the model: the base model with one or several adapters loaded onto it (each under its own name; the forward applies one at a time),
or merged into the base weights (``merge=True``: zero added latency; several adapters
merged are summed, seed 002's "switch tasks by adding and subtracting BA").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.data.readers import file_fingerprint
from lorakit.errors import LorakitError
from lorakit.run_folder import TASK_FILE, trained_folder
from lorakit.tasks import Task, evaluate, get_task, read_splits


@dataclass
class Trained:
    """A model rebuilt from saved training results.

    Attributes:
        model: the base model with the adapters loaded (or merged), in eval mode.
        tokenizer: its tokenizer.
        task: the task it was trained for.
        info: the contents of ``lorakit_task.json`` (of the first adapter).
        names: the adapter names, in the order given (``["merged"]`` after a merge,
            ``["full"]`` for a fully fine-tuned model, ``["base"]`` for the base model alone).
    """

    model: torch.nn.Module
    tokenizer: object
    task: Task
    info: dict
    names: list[str]

    def use(self, name: str) -> None:
        """Make adapter ``name`` the one the forward applies (no-op for a model without
        separate adapters: ``"merged"``, ``"full"``, ``"base"``)."""
        from lorakit.model import lora_configs, set_active

        if name in lora_configs(self.model):
            set_active(self.model, name)

    def max_length(self) -> int:
        """Tokens an input is cut to: the length it was trained with (the task's cap when the
        folder does not say), at most what the model's learned positions hold."""
        from lorakit.targets import position_limit

        length = self.info.get("max_length") or self.task.max_length_cap
        limit = position_limit(self.model)
        return min(length, limit) if limit is not None else length


def read_task_file(folder) -> dict:
    """``lorakit_task.json`` of a trained result (``folder``, or the saved result of the
    run folder ``folder``).

    Raises:
        LorakitError: see :func:`lorakit.run_folder.trained_folder`.
    """
    return json.loads((trained_folder(folder) / TASK_FILE).read_text())


def load_trained(adapters: list, merge: bool = False, model: str | None = None, task: str | None = None,
                 device: str = "cpu") -> Trained:
    """Rebuild the trained model from one or more folders written by ``lorakit train``.

    Args:
        adapters: adapter folders (PEFT format), or one full model folder, or the run
            folders (``--out``) holding them; empty for the base model alone (then
            ``task`` and ``model`` say which).
        merge: fold the adapters into the base weights (several: their sum).
        model: override the base model recorded in the folders.

    Raises:
        LorakitError: the folders disagree on task, base model or labels, a full model
            folder is mixed with others, or several classifiers are to be merged.
    """
    folders = [trained_folder(a) for a in adapters]
    infos = [json.loads((f / TASK_FILE).read_text()) for f in folders]
    if not infos:
        info = {"task": task or "chat", "method": "none", "model": model or "default", "labels": None,
                "max_length": None}
        found = get_task(info["task"])
        if found.trains_head:
            raise LorakitError(f"task {found.name!r} trains a head the base model lacks, so the base model alone "
                               "cannot be used; give --adapter DIR")
        net, tokenizer = found.load_model(info["model"], None)
        return Trained(net.to(device).eval(), tokenizer, found, info, ["base"])
    first = infos[0]
    for folder, info in zip(folders[1:], infos[1:]):
        for key in ("task", "model", "labels"):
            if info.get(key) != first.get(key):
                raise LorakitError(f"{folder} was trained with {key}={info.get(key)!r} but {folders[0]} with "
                                   f"{first.get(key)!r}; adapters used together need the same {key}")
    found = get_task(first["task"])
    if any(info["method"] == "full" for info in infos):
        if len(folders) > 1:
            raise LorakitError(f"{folders[0]} holds a fully fine-tuned model; it cannot be combined with other "
                               "folders: give it alone")
        net, tokenizer = found.load_model(str(folders[0]), first["labels"])
        return Trained(net.to(device).eval(), tokenizer, found, first, ["full"])
    if merge and found.trains_head and len(folders) > 1:
        raise LorakitError(f"each adapter of task {found.name!r} has its own classifier head, so several cannot be "
                           "merged into one model; drop --merge to compare them, or give one adapter")

    from lorakit.io import load_adapter
    from lorakit.model import merge_and_unload, set_active

    net, tokenizer = found.load_model(model or first["model"], first["labels"])
    names = _unique_names(folders)
    for folder, name in zip(folders, names):
        load_adapter(net, folder, name, activate=False)
    set_active(net, names[0])
    if merge:
        set_active(net, *names)
        net = merge_and_unload(net)
        names = ["merged"]
    return Trained(net.to(device).eval(), tokenizer, found, first, names)


def _unique_names(folders: list[Path]) -> list[str]:
    names = []
    for folder in folders:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", folder.resolve().parent.name + "_" + folder.name).strip("_") or "adapter"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


# ---------------------------------------------------------------- the three uses


def evaluate_trained(trained: Trained, data: str | None = None, batch_size: int | None = None,
                     columns: dict | None = None, progress: bool = False) -> dict:
    """Metrics of every adapter of ``trained`` on ``data``: ``{name: metrics}``; a
    classifier's include the majority-class baseline and the breakdown by class
    (:meth:`lorakit.tasks.Task.metrics`).

    ``data`` None scores the test split of the data it was trained on (refused when that
    file changed since); a file is scored whole (every record), its columns named as in
    training (``--text-column``...) unless ``columns`` names them (``{"label": "stars"}``).
    ``progress`` shows a bar per adapter.
    """
    from lorakit import data as lkdata
    from lorakit.tasks import encode_splits

    task, info = trained.task, trained.info
    batch_size = batch_size or task.default_eval_batch_size
    max_length = trained.max_length()
    columns = {**(info.get("columns") or {}), **(columns or {})} or None
    if data is None:
        source = info.get("data", "default")
        recorded = info.get("data_fingerprint")
        if recorded is not None and Path(source).is_file() and file_fingerprint(source) != recorded:
            raise LorakitError(f"{source} changed since this run trained on it, so splitting it again would put "
                               "training examples in the test split; give the examples to score with --data FILE")
        splits = read_splits(task, source, info.get("data_limit"), columns, info.get("stream"),
                             info.get("stream_buffer") or 10_000)
        splits = lkdata.DatasetSplits([], [], splits.test, splits.source)
        if not splits.test:
            raise LorakitError(f"{splits.source} has no test split; give --data FILE to evaluate on")
    else:
        records = task.read_records(data, columns)
        splits = lkdata.DatasetSplits([], [], records, str(data))
    encoded = encode_splits(task, splits, trained.tokenizer, max_length, info.get("labels"), allow_empty_train=True)
    pad_id = trained.tokenizer.pad_token_id if trained.tokenizer.pad_token_id is not None else 0
    device = next(trained.model.parameters()).device
    results = {}
    for name in trained.names:
        trained.use(name)
        results[name] = evaluate(task, trained.model, encoded.test, pad_id, batch_size, device,
                                 labels=info.get("labels"), progress=f"evaluating {name}" if progress else None)
    return results


def predict(trained: Trained, texts: list[str]) -> dict:
    """Class and probabilities of each text, for every adapter.

    Returns:
        ``{adapter name: [{"text", "label", "probabilities": {label: p}}, ...]}``.

    Raises:
        LorakitError: the model is not a classifier.
    """
    max_length = trained.max_length()
    results = {}
    for name in trained.names:
        trained.use(name)
        results[name] = trained.task.predict(trained.model, trained.tokenizer, texts, trained.info["labels"],
                                             max_length)
    return results


def generate(trained: Trained, prompts: list[str], max_new_tokens: int = 64) -> dict:
    """Greedy continuations of ``prompts`` for every adapter: ``{name: [answer, ...]}``.

    A chat model gets each prompt as a user turn through its chat template; the answer
    is the text it generates after it, special tokens removed.

    Raises:
        LorakitError: the model is not a language model.
    """
    results = {}
    for name in trained.names:
        trained.use(name)
        results[name] = trained.task.generate(trained.model, trained.tokenizer, prompts, max_new_tokens)
    return results
