"""Sequence classification: text -> one of the labels seen in training.

The model is a sequence classifier whose head (``classifier``, ``score``) is new: it
trains in full next to the adapter and is saved with it. Loss: cross-entropy per
example; metric: accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lorakit import data as lkdata
from lorakit.data.encode import Encoded
from lorakit.errors import LorakitError
from lorakit.tasks.base import Task


@dataclass(frozen=True, kw_only=True)
class ClassificationTask(Task):
    """A task whose records are ``{"text", "label"}`` and whose model picks a label."""

    metric: str = "accuracy"
    higher_is_better: bool = True

    trains_head: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("loss_sum", "count", "correct")

    def read_records(self, path) -> list[dict]:
        return lkdata.readers.read_classification(path)

    def labels(self, train: list[dict], source: str) -> list[str]:
        """The sorted labels of the training records.

        Raises:
            LorakitError: fewer than two classes (nothing to tell apart).
        """
        names = sorted({record["label"] for record in train})
        if len(names) < 2:
            held = f"only the label {names[0]!r}" if names else "no label"
            raise LorakitError(f"the training split of {source} has {held}; a classifier needs examples of at "
                               "least two classes")
        return names

    def encode(self, records, tokenizer, max_length, labels) -> Encoded:
        return lkdata.encode_classification(records, tokenizer, max_length,
                                            {name: i for i, name in enumerate(labels)})

    def fake_batch(self, batch_size, length) -> dict:
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.zeros(batch_size, dtype=torch.long)}

    def heads(self, model) -> list[str]:
        from lorakit.methods import head_modules

        return head_modules(model)

    def batch_stats(self, model, batch, label_smoothing=0.0) -> dict:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
        correct = (logits.argmax(-1) == labels).sum()
        return {"loss_sum": loss, "count": torch.tensor(labels.numel()), "correct": correct}

    def metrics(self, sums, examples) -> dict:
        count = max(sums["count"], 1)
        return {"loss": sums["loss_sum"] / count, "examples": examples, "accuracy": sums["correct"] / count}

    @torch.no_grad()
    def predict(self, model, tokenizer, texts, labels, max_length) -> list[dict]:
        batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        device = next(model.parameters()).device
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        probabilities = logits.float().softmax(-1).cpu()
        return [{"text": text, "label": labels[int(row.argmax())],
                 "probabilities": {label: float(p) for label, p in zip(labels, row)}}
                for text, row in zip(texts, probabilities)]


def load_classifier(spec: str, labels):
    from lorakit.models import load_classifier

    return load_classifier(spec, id2label=labels)
