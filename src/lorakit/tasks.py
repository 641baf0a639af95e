"""What is being learned: a registry of tasks, each knowing its model, data, loss and metric.

- ``classify``: a sequence classifier (default: the embedded all-MiniLM-L6-v2 on the
  embedded Rotten Tomatoes reviews, ``fresh`` / ``rotten``); metric: accuracy.
- ``chat``: a causal LM on chat turns, only assistant tokens trained (default: the
  embedded SmolLM2-135M-Instruct on the chatterbot corpus); metric: loss per token.
- ``text``: a causal LM on plain text or prompt/completion pairs (default: the same
  model on the review snippets as plain text); metric: loss per token.

Losses are returned as a *sum* and a *count* (examples, or trained tokens), so that a
batch split across gradient-accumulation steps or processes is normalised once, by the
count of the whole batch: the gradients then do not depend on how it was split.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lorakit import data as lkdata
from lorakit.chunked_loss import causal_lm_loss
from lorakit.data.encode import Encoded, EncodedExample, collate
from lorakit.errors import LorakitError


TASK_FILE = "lorakit_task.json"  # written beside a trained adapter/model: how to load and use it again


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


@dataclass(frozen=True)
class Task:
    """One kind of learning problem.

    Attributes:
        name: the ``--task`` value.
        kind: ``"classify"`` or ``"lm"`` (which records and loss it uses).
        metric: the number that picks the best checkpoint (``"accuracy"`` or ``"loss"``).
        higher_is_better: whether a larger ``metric`` is better.
        default_max_length: tokens per example when ``--max-length`` is not given.
        load_model: ``(spec, labels or None) -> (model, tokenizer)``.
        default_data: ``() -> DatasetSplits`` of the embedded dataset.
    """

    name: str
    kind: str
    metric: str
    higher_is_better: bool
    default_max_length: int
    load_model: Callable
    default_data: Callable

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


def _load_classifier(spec: str, labels):
    from lorakit.models import load_classifier

    return load_classifier(spec, id2label=labels)


def _load_causal_lm(spec: str, labels):
    from lorakit.models import load_causal_lm

    model, tokenizer = load_causal_lm("default-chat" if spec == "default" else spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _reviews_as_text():
    splits = lkdata.rotten_tomatoes(validation=200, test=200)

    def as_text(part):
        return [{"text": r["text"], "_where": r["_where"]} for r in part]

    return lkdata.DatasetSplits(as_text(splits.train), as_text(splits.validation), as_text(splits.test),
                                f"{splits.source} as plain text")


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` under ``task.name`` (what ``--task`` accepts)."""
    TASKS[task.name] = task
    return task


register_task(Task("classify", "classify", "accuracy", True, 64, _load_classifier, lkdata.rotten_tomatoes))
register_task(Task("chat", "lm", "loss", False, 256, _load_causal_lm, lkdata.chatterbot_pairs))
register_task(Task("text", "lm", "loss", False, 128, _load_causal_lm, _reviews_as_text))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LorakitError(f"task {name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name]


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
            splits = _read_folder(path, task.kind)
        else:
            records = lkdata.read_records(path, task.kind)
            group = "prompt" if records and "prompt" in records[0] else None
            splits = lkdata.split_records(records, 0.1, 0.1, source=str(path), group_key=group)
    if limit is not None:
        small = max(1, limit // 10)
        splits = lkdata.DatasetSplits(splits.train[:limit], splits.validation[:small], splits.test[:small],
                                      f"{splits.source}, first {limit}")
    return splits


def _read_folder(folder: Path, kind: str) -> lkdata.DatasetSplits:
    def find(stem, required=True):
        files = [folder / f"{stem}{suffix}" for suffix in lkdata.readers.SUFFIXES]
        found = [f for f in files if f.is_file()]
        if not found and required:
            raise LorakitError(f"data folder {folder} has no {stem}.jsonl or {stem}.csv; it holds "
                               f"{sorted(p.name for p in folder.iterdir())[:10]}")
        return lkdata.read_records(found[0], kind) if found else []

    return lkdata.DatasetSplits(find("train"), find("validation"), find("test", required=False), str(folder))


def encode_splits(task: Task, splits: lkdata.DatasetSplits, tokenizer, max_length: int,
                  labels: list[str] | None = None, allow_empty_train: bool = False) -> TaskData:
    """Tokenize the three splits; warn once when examples were truncated.

    For classification ``labels`` (class names by index) default to the sorted labels
    of the training split.

    Raises:
        LorakitError: a validation or test label absent from ``labels``; no training example.
    """
    if task.kind == "classify":
        labels = labels or sorted({r["label"] for r in splits.train})
        label2id = {name: i for i, name in enumerate(labels)}
        encode = lambda records: lkdata.encode_classification(records, tokenizer, max_length, label2id)  # noqa: E731
    else:
        encode = lambda records: lkdata.encode_language_modeling(records, tokenizer, max_length)  # noqa: E731
    parts: list[Encoded] = [encode(p) for p in (splits.train, splits.validation, splits.test)]
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
    return TaskData(parts[0].examples, parts[1].examples, parts[2].examples, splits.source,
                    labels if task.kind == "classify" else None, truncated, dropped)


# ---------------------------------------------------------------- loss and metric


def batch_stats(task: Task, model, batch: dict, label_smoothing: float = 0.0) -> dict:
    """``{"loss_sum", "count"}`` (+ ``"correct"`` for classify) of one batch, as tensors."""
    if task.kind == "lm":  # without the whole (tokens × vocabulary) logits at once
        loss, count = causal_lm_loss(model, batch, label_smoothing)
        return {"loss_sum": loss, "count": count}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
    correct = (logits.argmax(-1) == labels).sum()
    return {"loss_sum": loss, "count": torch.tensor(labels.numel()), "correct": correct}


@torch.no_grad()
def evaluate(task: Task, model, examples: list[EncodedExample], pad_id: int, batch_size: int = 64,
             device="cpu", rank: int = 0, world_size: int = 1) -> dict:
    """Mean loss (and accuracy for classify) of ``model`` on ``examples``.

    Examples are batched in order of length (less padding). Under torch.distributed
    each process takes every ``world_size``-th batch and the sums are all-reduced, so
    every process returns the same numbers.

    Returns:
        ``{"loss": nats per example or per token, "accuracy": fraction (classify),
        "perplexity": exp(loss) (lm), "examples": n}``.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(3, dtype=torch.float64)  # loss_sum, count, correct
    for batch_indices in batches[rank::world_size]:
        batch = collate([examples[i] for i in batch_indices], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        stats = batch_stats(task, model, batch)
        totals += torch.tensor([float(stats["loss_sum"]), float(stats["count"]), float(stats.get("correct", 0))],
                               dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    model.train(was_training)
    loss_total, count, correct = totals.tolist()
    loss = loss_total / max(count, 1)
    result = {"loss": loss, "examples": len(examples)}
    if task.kind == "classify":
        result["accuracy"] = correct / max(count, 1)
    else:
        result["perplexity"] = math.exp(min(loss, 50.0))
    return result
