"""What every task has, and the work that is the same for all: reading the splits,
encoding them, evaluating a model.

A :class:`Task` owns everything that differs between learning problems: which records
it reads, the class labels, how records become token ids, which modules are trained in
full (heads), the loss, the metrics, the defaults (max length, epochs, evaluation
batch), and how a trained model is used (``predict`` or ``generate``). Code outside
:mod:`lorakit.tasks` asks the task; it never asks which kind of task it is.

Losses are returned as a *sum* and a *count* (examples, or trained tokens), so that a
batch split across gradient-accumulation steps or processes is normalised once, by the
count of the whole batch: the gradients then do not depend on how it was split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from lorakit import data as lkdata
from lorakit.data.encode import Encoded, EncodedExample, collate
from lorakit.errors import LorakitError


class TruncationWarning(UserWarning):
    """Some examples were longer than ``max_length`` and were cut."""


@dataclass
class TaskData:
    """Encoded examples of the three splits, and what the report says about them."""

    train: list[EncodedExample]
    validation: list[EncodedExample]
    test: list[EncodedExample]
    source: str
    labels: list[str] | None = None  # class names by index (classification only)
    truncated: int = 0  # examples cut to max_length, all splits
    dropped: int = 0  # examples with nothing left to train on after the cut

    def sizes(self) -> dict:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


@dataclass(frozen=True, kw_only=True)
class Task:
    """One learning problem. Subclasses (:class:`~lorakit.tasks.classify.ClassificationTask`,
    :class:`~lorakit.tasks.language.LanguageModelTask`) define the behaviour.

    Attributes:
        name: the ``--task`` value.
        metric: the number that picks the best checkpoint (``"accuracy"`` or ``"loss"``).
        higher_is_better: whether a larger ``metric`` is better.
        default_max_length: tokens per example when ``--max-length`` is not given.
        default_epochs: passes over the training split when neither ``--steps`` nor
            ``--epochs`` is given.
        default_eval_batch_size: examples per evaluation forward pass.
        load_model: ``(spec, labels or None) -> (model, tokenizer)``.
        default_data: ``() -> DatasetSplits`` of the embedded dataset.
        trains_head: the model gets a new head that only training gives it (the base
            model alone is not usable, and adapters with their own heads do not merge).
        stats: the keys of :meth:`batch_stats`, summed over batches by :func:`evaluate`.
    """

    name: str
    metric: str
    higher_is_better: bool
    default_max_length: int
    default_epochs: float
    default_eval_batch_size: int
    load_model: Callable
    default_data: Callable

    trains_head: ClassVar[bool] = False
    stats: ClassVar[tuple[str, ...]] = ("loss_sum", "count")

    #: the model ``"default"`` stands for, and the transformers auto class a config is built
    #: into (what ``lorakit inspect --memory`` builds on fake tensors)
    default_model: ClassVar[str] = "default"
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"

    def fake_batch(self, batch_size: int, length: int) -> dict:
        """A ``(batch_size, length)`` batch of zeros shaped as :meth:`batch_stats` takes it."""
        raise NotImplementedError

    def fake_loss(self, model, batch: dict):
        """The training loss of ``batch`` for a model on fake tensors (no value-dependent shapes)."""
        return self.batch_stats(model, batch)["loss_sum"]

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    # ---- what a task kind defines

    def read_records(self, path) -> list[dict]:
        """The records of a user's file, checked (see :mod:`lorakit.data.readers`)."""
        raise NotImplementedError

    def labels(self, train: list[dict], source: str) -> list[str] | None:
        """Class names by index, from the training records; None for a task without classes."""
        return None

    def encode(self, records: list[dict], tokenizer, max_length: int, labels: list[str] | None) -> Encoded:
        """Records -> token ids with the training targets."""
        raise NotImplementedError

    def heads(self, model) -> list[str]:
        """Names of the modules trained in full next to an adapter (a classifier's head)."""
        return []

    def batch_stats(self, model, batch: dict, label_smoothing: float = 0.0) -> dict:
        """``{key: 0-d tensor}`` for the keys in :attr:`stats` (``loss_sum`` keeps its graph)."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], examples: int) -> dict:
        """The metrics of summed :meth:`batch_stats`: ``{"loss", "examples", ...}``."""
        raise NotImplementedError

    def predict(self, model, tokenizer, texts: list[str], labels, max_length: int) -> list[dict]:
        """``[{"text", "label", "probabilities"}]`` of each text (classification)."""
        raise LorakitError(f"predict needs a classification adapter; this one is for task {self.name!r}"
                           f"{self._other_verb('predict')}")

    def generate(self, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts`` (language models)."""
        raise LorakitError(f"generate needs a language-model adapter; this one is for task {self.name!r}"
                           f"{self._other_verb('generate')}")

    def _other_verb(self, verb: str) -> str:
        """``": use lorakit X"`` for the verb this task does define in place of ``verb``."""
        for other in ("predict", "generate"):
            if other != verb and getattr(type(self), other) is not getattr(Task, other):
                return f": use lorakit {other}"
        return ""


# ---------------------------------------------------------------- data


def read_splits(task: Task, data: str, limit: int | None = None) -> lkdata.DatasetSplits:
    """The records of ``data``: ``"default"`` (the task's embedded set), a file (split
    80/10/10 with a fixed seed), or a folder holding ``train``, ``validation`` and
    optionally ``test`` files (``.jsonl`` or ``.csv``).

    ``limit`` keeps the first ``limit`` training records and a tenth as many for
    validation and test (for quick runs and tests).
    """
    if data == "default":
        splits = task.default_data()
    else:
        path = Path(data)
        if path.is_dir():
            splits = _read_folder(path, task)
        else:
            records = task.read_records(path)
            group = "prompt" if records and "prompt" in records[0] else None
            splits = lkdata.split_records(records, 0.1, 0.1, source=str(path), group_key=group)
    if limit is not None:
        small = max(1, limit // 10)
        splits = lkdata.DatasetSplits(splits.train[:limit], splits.validation[:small], splits.test[:small],
                                      f"{splits.source}, first {limit}")
    return splits


def _read_folder(folder: Path, task: Task) -> lkdata.DatasetSplits:
    def find(stem, required=True):
        files = [folder / f"{stem}{suffix}" for suffix in lkdata.readers.SUFFIXES]
        found = [f for f in files if f.is_file()]
        if not found and required:
            raise LorakitError(f"data folder {folder} has no {stem}.jsonl or {stem}.csv; it holds "
                               f"{sorted(p.name for p in folder.iterdir())[:10]}")
        return task.read_records(found[0]) if found else []

    return lkdata.DatasetSplits(find("train"), find("validation"), find("test", required=False), str(folder))


def encode_splits(task: Task, splits: lkdata.DatasetSplits, tokenizer, max_length: int,
                  labels: list[str] | None = None, allow_empty_train: bool = False) -> TaskData:
    """Tokenize the three splits; warn once when examples were truncated.

    ``labels`` (class names by index) default to the task's labels of the training split.

    Raises:
        LorakitError: a validation or test label absent from ``labels``; no training example.
    """
    labels = labels or task.labels(splits.train, splits.source)
    parts: list[Encoded] = [task.encode(p, tokenizer, max_length, labels)
                            for p in (splits.train, splits.validation, splits.test)]
    truncated = sum(p.truncated for p in parts)
    dropped = sum(p.dropped for p in parts)
    total = sum(len(p) for p in (splits.train, splits.validation, splits.test))
    if truncated:
        longest = max(p.longest for p in parts)
        note = f"; {dropped} of them had no trained token left and were dropped" if dropped else ""
        warnings.warn(f"{truncated} of {total} examples were longer than max_length={max_length} tokens and were "
                      f"truncated (longest: {longest} tokens){note}; raise --max-length to keep more",
                      TruncationWarning, stacklevel=2)
    if not parts[0].examples and not allow_empty_train:
        raise LorakitError(f"{splits.source} leaves no training example after tokenization; check the data")
    return TaskData(parts[0].examples, parts[1].examples, parts[2].examples, splits.source, labels, truncated,
                    dropped)


# ---------------------------------------------------------------- metrics


@torch.no_grad()
def evaluate(task: Task, model, examples: list[EncodedExample], pad_id: int, batch_size: int = 64,
             device="cpu", rank: int = 0, world_size: int = 1) -> dict:
    """The task's metrics of ``model`` on ``examples`` (:meth:`Task.metrics`).

    Examples are batched in order of length (less padding). Under torch.distributed
    each process takes every ``world_size``-th batch and the sums are all-reduced, so
    every process returns the same numbers; every process runs as many forward passes
    (one left without a batch runs the shortest one and does not count it), since a model
    sharded with FSDP gathers its weights from all processes in each forward.

    Returns:
        e.g. ``{"loss": nats per example, "examples": n, "accuracy": fraction}`` (classify)
        or ``{"loss": nats per token, "examples": n, "perplexity": exp(loss)}`` (language models).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(len(task.stats), dtype=torch.float64)
    mine, rounds = batches[rank::world_size], -(-len(batches) // world_size)
    for i in range(rounds):
        batch = collate([examples[j] for j in (mine[i] if i < len(mine) else batches[0])], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        stats = task.batch_stats(model, batch)
        if i < len(mine):
            totals += torch.tensor([float(stats[key]) for key in task.stats], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    model.train(was_training)
    return task.metrics(dict(zip(task.stats, totals.tolist())), len(examples))
