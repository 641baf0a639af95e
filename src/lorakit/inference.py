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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit import chat_templates
from lorakit.data.files import file_fingerprint
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
        infos: each adapter's own ``lorakit_task.json`` by name (a classifier of another label
            set, trained on other data or to another length); empty where ``info`` stands for all.
    """

    model: torch.nn.Module
    tokenizer: object
    task: Task
    info: dict
    names: list[str]
    infos: dict = field(default_factory=dict)

    def info_of(self, name: str) -> dict:
        """``lorakit_task.json`` of adapter ``name``."""
        return self.infos.get(name, self.info)

    def use(self, name: str) -> None:
        """Make adapter ``name`` the one the forward applies (no-op for a model without
        separate adapters: ``"merged"``, ``"full"``, ``"base"``)."""
        from lorakit.model import lora_configs, set_active

        if name in lora_configs(self.model):
            set_active(self.model, name)

    def max_length(self, name: str | None = None) -> int:
        """Tokens an input is cut to: the length adapter ``name`` (default: the first) was trained
        with (the task's cap when the folder does not say), at most what the model's learned
        positions hold."""
        from lorakit.targets import position_limit

        info = self.info if name is None else self.info_of(name)
        length = info.get("max_length") or self.task.max_length_cap
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
                 device: str = "cpu", chat_template: str | None = None) -> Trained:
    """Rebuild the trained model from one or more folders written by ``lorakit train``.

    Args:
        adapters: adapter folders (PEFT format), or one full model folder, or the run
            folders (``--out``) holding them; empty for the base model alone (then
            ``task`` and ``model`` say which).
        merge: fold the adapters into the base weights (several: their sum).
        model: override the base model recorded in the folders.
        chat_template: the chats' template instead of the base tokenizer's
            (:func:`lorakit.chat_templates.resolve`: ``chatml`` or a template file); the one
            an adapter carries (``chat_template.jinja``), or a fully fine-tuned model's
            tokenizer, still wins, as on the server.

    Classifiers of different label sets may be given together (each adapter brings its own
    head; :mod:`lorakit.peft_load`), not merged.

    Raises:
        LorakitError: the folders disagree on task or base model, a full model folder is mixed
            with others, or several classifiers are to be merged.
    """
    chat_templates.check(chat_template)
    read = [_folder_info(a, task, model) for a in adapters]
    folders, infos = [folder for folder, _ in read], [info for _, info in read]
    found = get_task(infos[0]["task"] if infos else task or "chat")
    if chat_template is not None and found.trains_head:
        raise LorakitError(f"--chat-template is for a model that generates; task {found.name!r} classifies")
    if not infos:
        info = {"task": found.name, "method": "none", "model": model or "default", "labels": None,
                "max_length": None}
        if found.trains_head:
            raise LorakitError(f"task {found.name!r} trains a head the base model lacks, so the base model alone "
                               "cannot be used; give --adapter DIR")
        net, tokenizer = found.load_model(info["model"], None)
        chat_templates.apply(tokenizer, chat_template)
        return Trained(net.to(device).eval(), tokenizer, found, info, ["base"])
    first = infos[0]
    for folder, info in zip(folders[1:], infos[1:]):
        for key in ("task", "model"):
            if info.get(key) != first.get(key):
                raise LorakitError(f"{folder} was trained with {key}={info.get(key)!r} but {folders[0]} with "
                                   f"{first.get(key)!r}; adapters used together need the same {key}")
    if any(info["method"] == "full" for info in infos):
        if len(folders) > 1:
            raise LorakitError(f"{folders[0]} holds a fully fine-tuned model; it cannot be combined with other "
                               "folders: give it alone")
        net, tokenizer = found.load_model(str(folders[0]), first["labels"])
        if not getattr(tokenizer, "chat_template", None):  # the model's own, trained with, wins
            chat_templates.apply(tokenizer, chat_template)
        return Trained(net.to(device).eval(), tokenizer, found, first, ["full"])
    if merge and found.trains_head and len(folders) > 1:
        raise LorakitError(f"each adapter of task {found.name!r} has its own classifier head, so several cannot be "
                           "merged into one model; drop --merge to compare them, or give one adapter")

    from lorakit.io import load_adapter
    from lorakit.model import merge_and_unload, set_active

    net, tokenizer = found.load_model(model or first["model"], first["labels"])
    chat_templates.apply(tokenizer, chat_template)
    _apply_saved_template(tokenizer, folders)  # an adapter's own template wins, as on the server
    names = _unique_names(folders)
    for folder, name in zip(folders, names):
        load_adapter(net, folder, name, activate=False)
    set_active(net, names[0])
    if merge:
        set_active(net, *names)
        net = merge_and_unload(net)
        return Trained(net.to(device).eval(), tokenizer, found, first, ["merged"])
    return Trained(net.to(device).eval(), tokenizer, found, first, names, dict(zip(names, infos)))


def _folder_info(path, task: str | None, model: str | None) -> tuple[Path, dict]:
    """``(the trained result's folder, its lorakit_task.json)``; for an adapter folder PEFT wrote (no
    task file), what its config says: the task from ``task_type`` (``SEQ_CLS``: classify, or regress where
    the head it saves has one output; else
    ``task``, or chat), the base from ``model`` or ``base_model_name_or_path``, no labels (the
    model's own), no recorded data or length."""
    from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, adapter_config_dict
    from lorakit.peft_format import SEQ_CLS, check_runnable, saved_head_outputs
    from lorakit.run_folder import RunFolder

    path = Path(path)
    if path.is_dir() and not (path / TASK_FILE).is_file() and (path / CONFIG_NAME).is_file() \
            and not RunFolder(path).is_run():
        config = adapter_config_dict(path)
        check_runnable(config.get("task_type"), path)
        kind = "classify" if config.get("task_type") == SEQ_CLS else task or "chat"
        if kind == "classify" and saved_head_outputs(path / WEIGHTS_NAME) == 1:  # one output: a regression
            kind = "regress"
        return path, {"task": kind, "method": "lora", "labels": None, "max_length": None, "data": None,
                      "model": model or config.get("base_model_name_or_path") or "default"}
    folder = trained_folder(path)
    return folder, json.loads((folder / TASK_FILE).read_text())


def _apply_saved_template(tokenizer, folders: list[Path]) -> None:
    """Give ``tokenizer`` the chat template the adapters were trained with (``chat_template.jinja``
    beside them, from ``lorakit train --chat-template``), where they carry one."""
    templates = {folder: chat_templates.saved(folder) for folder in folders}
    carried = {t for t in templates.values() if t}
    if len(carried) > 1:
        carriers = ", ".join(str(folder) for folder, template in templates.items() if template)
        raise LorakitError(f"the adapters carry different chat templates ({carriers}); use them one at a time")
    if carried:
        tokenizer.chat_template = carried.pop()


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

    ``data`` None scores each adapter on the test split of the data it was trained on (refused
    when that file changed since); a file is scored whole (every record), its columns named as
    in training (``--text-column``...) unless ``columns`` names them (``{"label": "stars"}``).
    Each adapter reads its examples with its own labels and length; adapters that share them
    share one encoding. ``progress`` shows a bar per adapter. A classifier adapter PEFT wrote
    (no labels recorded) scores its classes as its model's config names them
    (:func:`lorakit.tasks.classify.model_labels`; a placeholder ``LABEL_1`` is also the data's label ``1``).
    """
    from lorakit.tasks import encode_splits

    task = trained.task
    batch_size = batch_size or task.default_eval_batch_size
    pad_id = trained.tokenizer.pad_token_id if trained.tokenizer.pad_token_id is not None else 0
    device = next(trained.model.parameters()).device
    read, encoded, results = {}, {}, {}
    for name in trained.names:
        info = trained.info_of(name)
        labels = info.get("labels")
        if labels is None and task.has_classes:  # an adapter PEFT wrote: the classes as its model names them
            from lorakit.tasks.classify import model_labels

            labels = model_labels(trained.model, trained.model.config.num_labels)
        named = {**(info.get("columns") or {}), **(columns or {})} or None
        where = json.dumps([data, named] if data is not None else
                           [info.get("data", "default"), named, info.get("data_limit"), info.get("stream")])
        if where not in read:
            read[where] = _scored_split(task, info, data, named)
        max_length = trained.max_length(name)
        key = json.dumps([where, labels, max_length])
        if key not in encoded:
            encoded[key] = encode_splits(task, read[where], trained.tokenizer, max_length, labels,
                                         allow_empty_train=True).test
        trained.use(name)
        results[name] = evaluate(task, trained.model, encoded[key], pad_id, batch_size, device,
                                 labels=labels, progress=f"evaluating {name}" if progress else None)
    return results


def _scored_split(task: Task, info: dict, data: str | None, columns: dict | None):
    """The examples to score, as the test part of a ``DatasetSplits``: ``data`` whole, or the
    test split of the data ``info`` (a ``lorakit_task.json``) was trained on."""
    from lorakit import data as lkdata

    if data is not None:
        return lkdata.DatasetSplits([], [], task.read_records(data, columns), str(data))
    source = info.get("data", "default")
    if source is None:
        raise LorakitError("this adapter folder records no data it was trained on (PEFT wrote it, without "
                           "lorakit_task.json); give the examples to score with --data FILE")
    recorded = info.get("data_fingerprint")
    if recorded is not None and Path(source).is_file() and file_fingerprint(source) != recorded:
        raise LorakitError(f"{source} changed since this run trained on it, so splitting it again would put "
                           "training examples in the test split; give the examples to score with --data FILE")
    splits = read_splits(task, source, info.get("data_limit"), columns, info.get("stream"),
                         info.get("stream_buffer") or 10_000)
    if not splits.test:
        raise LorakitError(f"{splits.source} has no test split; give --data FILE to evaluate on")
    return lkdata.DatasetSplits([], [], splits.test, splits.source)


def predict(trained: Trained, texts: list, batch_size: int | None = None, progress: bool = False) -> dict:
    """Class and probabilities of each text, for every adapter (an adapter trained on pairs of texts
    takes each as ``"first<TAB>second"`` or ``[first, second]``), ``batch_size`` texts a forward pass
    (default: the task's evaluation batch); ``progress`` shows a bar per adapter.

    Returns:
        ``{adapter name: [{"text", "label", "probabilities": {label: p}}, ...]}``.

    Raises:
        LorakitError: the model is not a classifier.
    """
    results = {}
    for name in trained.names:
        trained.use(name)
        info = trained.info_of(name)
        results[name] = trained.task.predict(trained.model, trained.tokenizer, texts, info["labels"],
                                             trained.max_length(name), pairs=bool(info.get("pairs")),
                                             batch_size=batch_size, progress=f"predicting {name}" if progress else None)
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
