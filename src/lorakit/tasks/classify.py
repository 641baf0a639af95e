"""Sequence classification: text -> one of the labels seen in training.

The model is a sequence classifier whose head (``classifier``, ``score``) is new: it
trains in full next to the adapter and is saved with it. Loss: cross-entropy per
example (with ``class_weights``, PyTorch's weighted cross-entropy: each example counts
its class's weight, and the sum is divided by the batch's summed weights); metric:
accuracy, reported beside macro-F1 and the majority-class baseline
(:mod:`lorakit.tasks.scores`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lorakit import data as lkdata
from lorakit.data.encode import Encoded, text_inputs
from lorakit.data.labels import LabelWarning, class_order, number_renames, number_value
from lorakit.data.readers import classification_records, classify_checker
from lorakit.data.stream import EncodedStream, RecordStream
from lorakit.errors import LorakitError
from lorakit.tasks import scores
from lorakit.tasks.base import Task

CLASS_WEIGHTS = ("balanced",)  # the --class-weights rules
#: the names transformers gives classes its config does not name: LABEL_0, LABEL_1, ...
PLACEHOLDER = "LABEL_"
# fewer training examples than this and a class can hardly be learned, nor scored on a validation or test split
# (a 10% split of 5 examples holds none of them); a warning names such classes
RARE_CLASS = 5
# more classes than this that are all numbers (or any number with a fraction) are more likely scores than classes
NUMBER_CLASSES = 20


@dataclass(frozen=True, kw_only=True)
class ClassificationTask(Task):
    """A task whose records are ``{"text", "label"}`` and whose model picks a label."""

    metric: str = "accuracy"
    higher_is_better: bool = True

    trains_head: ClassVar[bool] = True
    has_classes: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("loss_sum", "count", "correct")
    outputs: ClassVar[tuple[str, ...]] = ("predicted", "target")
    stratify_key: ClassVar[str | None] = "label"
    group_keys: ClassVar[tuple[str, ...]] = ("text",)

    def read_records(self, path, columns=None) -> list[dict]:
        return lkdata.readers.read_classification(path, columns, self.has_classes)

    def check_records(self, raw, source, columns=None) -> list[dict]:
        return classification_records(raw, source, columns, self.has_classes)

    def stream_records(self, path, columns, buffer, limit) -> RecordStream:
        renames = number_renames if self.has_classes else None  # a number's spellings made one class
        return RecordStream(path, lambda first: classify_checker(columns, first), buffer, limit, renames,
                            self.group_keys)

    def class_counts(self, train) -> Counter:
        """Training records per label (a stream counted them as it was opened)."""
        if isinstance(train, RecordStream):
            return Counter(train.label_counts)
        return Counter(record["label"] for record in train)

    def labels(self, train, source: str) -> list[str]:
        """The labels of the training records in class order (:func:`lorakit.data.labels.class_order`).

        Raises:
            LorakitError: fewer than two classes (nothing to tell apart), or more classes than
                half the examples (past 50: an id or text column given as the label).
        """
        counts = self.class_counts(train)
        names = class_order(counts)
        examples = sum(counts.values())
        if len(names) > max(50, examples // 2):
            numbers = all(number_value(name) is not None for name in names)
            scores = ("; if they are scores (a similarity, a rating) to fit as numbers, train --task regress"
                      if numbers else "")
            raise LorakitError(f"the label column of {source} holds {len(names):,} different values among "
                               f"{examples:,} training records (e.g. {names[0][:40]!r}), so most classes have one "
                               f"example; is it the right column? (--label-column names another){scores}")
        if len(names) < 2:
            held = f"only the label {names[0]!r}" if names else "no label"
            raise LorakitError(f"the training split of {source} has {held}; a classifier needs examples of at "
                               "least two classes")
        values = [number_value(name) for name in names]
        if all(v is not None for v in values) and (len(names) > NUMBER_CLASSES or any(v % 1 for v in values)):
            warnings.warn(f"{source}: the {len(names)} classes are numbers (e.g. {names[0]!r}, {names[-1]!r}); if "
                          "they are scores to fit (a similarity, a rating), train --task regress", LabelWarning,
                          stacklevel=2)
        rare = [name for name in names if counts[name] < RARE_CLASS]
        if rare:
            shown = ", ".join(f"{name!r} ({counts[name]})" for name in rare[:5]) + (" ..." if len(rare) > 5 else "")
            warnings.warn(f"{source}: {len(rare)} class(es) with fewer than {RARE_CLASS} training examples, too few "
                          f"to learn or to score: {shown}; add examples of them, or leave them out",
                          LabelWarning, stacklevel=2)
        return names

    def class_weights(self, train, labels: list[str], rule: str) -> torch.Tensor:
        """``(k,)`` weights of the classes by index: ``"balanced"`` gives class c the weight
        ``n / (k * n_c)`` (scikit-learn's ``class_weight="balanced"``), so every class
        carries the same total weight in an epoch.

        Raises:
            LorakitError: an unknown rule.
        """
        if rule not in CLASS_WEIGHTS:
            raise LorakitError(f"--class-weights {rule!r} is unknown; choose one of {list(CLASS_WEIGHTS)}")
        # the formula of sklearn's compute_class_weight("balanced"), from the counts alone: it
        # would need every label of the split repeated, and a streamed split is not held
        counts = self.class_counts(train)
        n_c = torch.tensor([counts[name] for name in labels], dtype=torch.float64)
        return (n_c.sum() / (len(labels) * n_c.clamp(min=1))).float()

    def token_lengths(self, records, tokenizer) -> list[int]:
        texts = text_inputs(records)
        return [len(ids) for ids in tokenizer(*texts, truncation=False, verbose=False)["input_ids"]] if records else []

    def encode(self, records, tokenizer, max_length, labels) -> Encoded:
        """The records as examples of the classes ``labels`` (by index); a class named by
        transformers' placeholder ``LABEL_i`` (a model trained elsewhere on integer classes) is
        also the data's label ``i``."""
        label2id = {name: i for i, name in enumerate(labels)}
        placeholders = {str(i): i for i, name in enumerate(labels) if name == f"{PLACEHOLDER}{i}"}
        return lkdata.encode_classification(records, tokenizer, max_length, {**placeholders, **label2id})

    def fake_batch(self, batch_size, length) -> dict:
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.zeros(batch_size, dtype=torch.long)}

    def heads(self, model) -> list[str]:
        from lorakit.methods import head_modules

        return head_modules(model)

    def batch_stats(self, model, batch, label_smoothing=0.0, class_weights=None) -> dict:
        """Summed loss, count and correct answers of ``batch``; with ``class_weights`` (``(k,)``)
        the loss sums ``w[y_i] * CE_i`` and the count is ``sum w[y_i]``, so that their ratio
        is ``F.cross_entropy(weight=w)``'s mean."""
        logits = model(**model_inputs(batch)).logits
        labels = batch["labels"]
        weight = class_weights.to(logits.device) if class_weights is not None else None
        loss = F.cross_entropy(logits.float(), labels, weight=weight, reduction="sum", label_smoothing=label_smoothing)
        predicted = logits.argmax(-1)
        count = weight[labels].sum() if weight is not None else torch.tensor(labels.numel())
        return {"loss_sum": loss, "count": count, "correct": (predicted == labels).sum(), "predicted": predicted,
                "target": labels}

    def batch_count(self, examples, class_weights=None, **loss_options) -> float:
        if class_weights is None:
            return float(len(examples))
        return float(sum(float(class_weights[e.label]) for e in examples))

    def metrics(self, sums, examples, outputs=None, labels=None, detail=False) -> dict:
        """Loss per example (unweighted in evaluation), accuracy and macro-F1 beside the
        majority-class baseline (:func:`lorakit.tasks.scores.scores`); with ``labels``, the
        per-class breakdown under ``"classes"``."""
        count = max(sums["count"], 1)
        metrics = {"loss": sums["loss_sum"] / count, "examples": examples, "accuracy": sums["correct"] / count}
        if outputs is not None:
            metrics.update(scores.scores(outputs["target"], outputs["predicted"]))
            if labels is not None:
                metrics["classes"] = scores.breakdown(outputs["target"], outputs["predicted"], labels)
        return metrics

    def verdict(self, metrics, split, advise=True) -> str | None:
        return scores.verdict(metrics, split, advise) if "majority_accuracy" in metrics else None

    def figures(self, metrics, folder, split) -> dict[str, str]:
        """The confusion matrix (``confusion.png``), where ``metrics`` hold the breakdown by class."""
        if not metrics.get("classes"):
            return {}
        from lorakit.plots import plot_confusion_matrix

        matrix = metrics["classes"]["confusion_matrix"]
        return {"confusion_path": str(plot_confusion_matrix(matrix["matrix"], matrix["labels"], folder.confusion,
                                                            title=f"{split} confusion matrix"))}

    def why(self, train_losses, validation, train, labels, lr, weighted) -> str | None:
        """:func:`lorakit.tasks.scores.why` of the last tenth of the training losses and the validation loss,
        each against knowing only the class shares of ``train`` (the encoded training split; with class
        weights: ln k in training)."""
        if not train_losses or not labels or "classes" not in validation:
            return None
        import math

        import numpy as np

        if isinstance(train, EncodedStream):  # a stream counted its labels as it was opened
            shares = np.array([train.records.label_counts[name] for name in labels])
        else:  # encoded examples, each with its class's index
            counts = Counter(example.label for example in train)
            shares = np.array([counts[i] for i in range(len(labels))])
        support = np.array([validation["classes"]["per_class"][name]["support"] for name in labels])
        tail = train_losses[-max(1, len(train_losses) // 10):]
        reference = math.log(len(labels)) if weighted else scores.shares_loss(shares)
        return scores.why(sum(tail) / len(tail), reference, validation["loss"], scores.shares_loss(shares, support),
                          lr, weighted)

    def report_rows(self, split, metrics) -> list[tuple[str, str]]:
        if "majority_accuracy" not in metrics:
            return super().report_rows(split, metrics)
        return scores.rows(split, metrics)

    def predict(self, model, tokenizer, texts, labels, max_length, pairs: bool = False, batch_size: int | None = None,
                progress: str | None = None) -> list[dict]:
        """Label and probabilities of each text; with ``pairs`` (an adapter trained on pairs of texts) each
        text holds its two texts separated by a tab, or is a ``[first, second]`` list (:func:`split_pairs`).
        Texts go through the model ``batch_size`` at a time (default: the task's evaluation batch), in order
        of length (less padding); ``progress``: a progress bar's title, shown where there are several batches."""
        probabilities = head_outputs(model, tokenizer, texts, max_length, pairs, batch_size or
                                     self.default_eval_batch_size, progress).softmax(-1)
        labels = labels if labels is not None else model_labels(model, probabilities.shape[-1])
        return [{"text": text, "label": labels[int(row.argmax())],
                 "probabilities": {label: float(p) for label, p in zip(labels, row)}}
                for text, row in zip(texts, probabilities)]


@torch.no_grad()
def head_outputs(model, tokenizer, texts, max_length: int, pairs: bool, batch_size: int,
                 progress: str | None = None) -> torch.Tensor:
    """``(len(texts), outputs)`` fp32 logits of a sequence classifier for ``texts`` (with ``pairs``, each
    ``"first<TAB>second"`` or ``[first, second]``: :func:`split_pairs`), cut to ``max_length`` tokens, run
    ``batch_size`` at a time in order of length (less padding), with a ``progress`` bar where there are
    several batches."""
    inputs = split_pairs(texts) if pairs else (list(texts),)
    encoded = tokenizer(*inputs, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    starts = range(0, len(order), batch_size)
    if progress and len(starts) > 1:
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False, disable=None)
    device, parts = next(model.parameters()).device, []
    for start in starts:
        rows = order[start:start + batch_size]
        batch = tokenizer.pad([{key: values[i] for key, values in encoded.items()} for i in rows],
                              return_tensors="pt")
        parts.append(model(**{k: v.to(device) for k, v in model_inputs(batch, pairs).items()}).logits.float().cpu())
    outputs = torch.empty(len(texts), parts[0].shape[-1]) if parts else torch.empty(0, 0)
    if parts:
        outputs[order] = torch.cat(parts)
    return outputs


def model_labels(model, classes: int) -> list[str]:
    """The classes of a classifier whose run recorded none (an adapter PEFT wrote), by index, as its
    config's ``id2label`` names them (transformers' placeholder ``LABEL_i`` where it names none)."""
    names = getattr(model.config, "id2label", None) or {}
    return [str(names.get(i, f"{PLACEHOLDER}{i}")) for i in range(classes)]


def load_classifier(spec: str, labels):
    from lorakit.models import load_classifier

    return load_classifier(spec, id2label=labels)


def split_pairs(texts) -> tuple[list[str], list[str]]:
    """``(first texts, second texts)`` of inputs to a classifier of pairs, each ``"first<TAB>second"``
    or a ``[first, second]`` list (the server's JSON).

    Raises:
        LorakitError: a text holds no tab.
    """
    firsts, seconds = [], []
    for text in texts:
        if isinstance(text, (list, tuple)):
            firsts.append(text[0])
            seconds.append(text[1])
            continue
        first, tab, second = text.partition("\t")
        if not tab:
            raise LorakitError(f"{text[:60]!r} is one text, but this adapter classifies pairs of texts (it was "
                               "trained on two text columns): give each as 'first<TAB>second' (or, to the "
                               "server, a [first, second] list)")
        firsts.append(first)
        seconds.append(second)
    return firsts, seconds


def model_inputs(batch, pairs: bool = True) -> dict:
    """What a classifier is given of a tokenized ``batch``: the ids and the mask, and for a pair of
    texts the segment ids where the tokenizer gives them (BERT's token types; a GPT-2 tokenizer gives
    none, and GPT-2 would read them as word ids)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if pairs and "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs
