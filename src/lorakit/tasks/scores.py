"""Honest scores for a classifier, with scikit-learn: accuracy and macro-F1 beside the
majority-class baseline, per-class precision and recall, the confusion matrix, and a
plain warning when the model does not beat the baseline.

The baseline is scikit-learn's ``DummyClassifier(strategy="most_frequent")`` fitted on
the very labels being scored: always answering the split's most frequent class, the
best any constant answer can do there. A model that always answers one class therefore
never beats it, whichever class that is.
"""

from __future__ import annotations

import numpy as np


def scores(target: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy and macro-F1 of ``predicted`` against ``target`` (class indices, ``(n,)``),
    and the same two numbers for the majority-class baseline.

    Returns:
        ``{"accuracy", "macro_f1", "majority_accuracy", "majority_macro_f1"}`` (fractions);
        macro-F1 averages the classes present in ``target`` or ``predicted``, a class never
        predicted scoring 0 (scikit-learn's ``zero_division=0``).
    """
    from sklearn.metrics import accuracy_score, f1_score

    if len(target) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "majority_accuracy": 0.0, "majority_macro_f1": 0.0}
    majority = majority_answers(target)
    return {
        "accuracy": float(accuracy_score(target, predicted)),
        "macro_f1": float(f1_score(target, predicted, average="macro", zero_division=0)),
        "majority_accuracy": float(accuracy_score(target, majority)),
        "majority_macro_f1": float(f1_score(target, majority, average="macro", zero_division=0)),
    }


def majority_answers(target: np.ndarray) -> np.ndarray:
    """What the majority-class baseline answers for each example (ties: the lowest index)."""
    from sklearn.dummy import DummyClassifier

    baseline = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(target), 1)), target)
    return baseline.predict(np.zeros((len(target), 1)))


def breakdown(target: np.ndarray, predicted: np.ndarray, names: list[str]) -> dict:
    """Per-class precision / recall / F1 / support and the confusion matrix, keyed by class name.

    Returns:
        ``{"majority_class": name, "per_class": {name: {"precision", "recall", "f1", "support"}},
        "confusion_matrix": {"labels": names, "matrix": [[count]]}}``, where ``matrix[i][j]``
        counts examples of class ``i`` answered ``j`` (rows: truth, columns: answer).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    indices = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        target, predicted, labels=indices, zero_division=0)
    matrix = confusion_matrix(target, predicted, labels=indices)
    majority = int(majority_answers(target)[0]) if len(target) else 0
    return {
        "majority_class": names[majority],
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(names)},
        "confusion_matrix": {"labels": list(names), "matrix": matrix.tolist()},
    }


def verdict(metrics: dict, split: str, advise: bool = True) -> str | None:
    """The warning line when ``metrics`` (of :func:`scores`, with ``"classes"`` from
    :func:`breakdown` if known) do not beat the majority-class baseline, or beat it while finding
    none of a class's examples (:func:`missed_classes`); None when neither.
    ``advise=False`` leaves out what to try (where a :func:`why` line follows with its own)."""
    accuracy, baseline = metrics["accuracy"], metrics["majority_accuracy"]
    f1, baseline_f1 = metrics["macro_f1"], metrics["majority_macro_f1"]
    answer = metrics.get("classes", {}).get("majority_class")
    always = f"always answering {answer!r}" if answer is not None else "always answering the majority class"
    if accuracy > baseline and f1 > baseline_f1:
        if not (missed := missed_classes(metrics)):
            return None
        shown = ", ".join(f"{name!r} ({support} examples)" for name, support in missed[:3])
        return (f"warning: the model beats {always} but found none of the {split} split's {shown}"
                + (f" and {len(missed) - 3} more class(es)" if len(missed) > 3 else "")
                + ("; try --class-weights balanced, or more training examples of them" if advise else ""))
    if accuracy <= baseline and f1 <= baseline_f1:
        return (f"warning: {split} accuracy {accuracy:.3f} is no better than {always} ({baseline:.3f}), and macro-F1 "
                f"{f1:.3f} no better than its {baseline_f1:.3f}: the model has not learned to tell the classes apart"
                + ("; train longer (--steps), or try --class-weights balanced" if advise else ""))
    if accuracy <= baseline:
        return (f"warning: {split} accuracy {accuracy:.3f} does not beat {always} ({baseline:.3f}), though macro-F1 "
                f"{f1:.3f} beats its {baseline_f1:.3f}: the model trades the majority class for the others")
    return (f"warning: {split} macro-F1 {f1:.3f} does not beat {always} ({baseline_f1:.3f}), though accuracy "
            f"{accuracy:.3f} beats its {baseline:.3f}")


#: a class with at least this many scored examples, none of them found, is named by :func:`verdict`
MISSED_SUPPORT = 5


def missed_classes(metrics: dict) -> list[tuple[str, int]]:
    """``(class, examples)`` of each class with at least :data:`MISSED_SUPPORT` examples in the scored split
    of which the model found none (recall 0), most examples first; empty without a breakdown by class."""
    per_class = metrics.get("classes", {}).get("per_class", {})
    missed = [(name, int(c["support"])) for name, c in per_class.items()
              if c["support"] >= MISSED_SUPPORT and c["recall"] == 0]
    return sorted(missed, key=lambda item: -item[1])


#: a training loss at or above this share of the class shares' own loss: nothing learned from the texts
STILL_AT_SHARES = 0.9
#: a training loss under this share of it, with the validation loss at or above STILL_AT_SHARES of its own:
#: the training texts fitted, nothing carried to new ones
FITTED = 0.8


def shares_loss(counts: np.ndarray, scored: np.ndarray | None = None) -> float:
    """The cross-entropy of always answering the class shares of ``counts`` (training examples per class):
    what a model that learned only how common each class is scores, on examples whose classes number
    ``scored`` per class (default: the training examples themselves, the shares' entropy)."""
    shares = np.asarray(counts, dtype=np.float64) / max(float(np.sum(counts)), 1.0)
    scored = np.asarray(counts if scored is None else scored, dtype=np.float64)
    present = scored > 0
    return float(-(scored[present] * np.log(np.clip(shares[present], 1e-12, None))).sum() / max(scored.sum(), 1.0))


def why(train_loss: float, train_reference: float, validation_loss: float, validation_reference: float,
        lr: float, weighted: bool) -> str | None:
    """A line saying why a classifier did not beat the baseline, from its losses against what knowing only the
    class shares scores (:func:`shares_loss`; with class weights, the training reference is ln k):
    ``train_loss`` (the end of training) still about its reference: it learned nothing from the texts (the rate
    or the length); far under it while ``validation_loss`` stays near its own: it fitted the training texts and
    nothing carried over (the labels do not follow from the texts, or too few examples). None otherwise."""
    if train_loss >= STILL_AT_SHARES * train_reference:
        weights = "" if weighted else ", or --class-weights balanced"
        return (f"why: the training loss ended at {train_loss:.2f}, not clearly under the {train_reference:.2f} of "
                f"knowing only how common each class is: the model did not learn from the texts; try --lr {lr / 2:g} or "
                f"{lr * 2:g}, more --steps{weights}")
    if train_loss < FITTED * train_reference and validation_loss >= STILL_AT_SHARES * validation_reference:
        return (f"why: the training loss fell to {train_loss:.2f}, under the {train_reference:.2f} of knowing only "
                f"how common each class is, but the validation loss did not ({validation_loss:.2f}; knowing only "
                f"that: {validation_reference:.2f}): the model fitted the training texts without learning what "
                "carries over to new ones; check that the labels follow from the texts, or give more examples of "
                "each class")
    return None


PRINTED_CLASSES = 12  # a confusion matrix of more classes is not printed whole (it would not fit a terminal)


def rows(split: str, metrics: dict) -> list[tuple[str, str]]:
    """Report lines (name, value) for ``metrics`` of one split: the scores beside the
    baseline, then each class's precision and recall, then the confusion matrix."""
    out = [(f"{split} accuracy", f"{metrics['accuracy']:.3f} (majority-class baseline {metrics['majority_accuracy']:.3f})"),
           (f"{split} macro-F1", f"{metrics['macro_f1']:.3f} (majority-class baseline {metrics['majority_macro_f1']:.3f})")]
    classes = metrics.get("classes")
    if not classes:
        return out
    for name, c in classes["per_class"].items():
        out.append((f"class {name}", f"precision {c['precision']:.3f}  recall {c['recall']:.3f}  f1 {c['f1']:.3f}  "
                                 f"({c['support']} examples)"))
    names, matrix = classes["confusion_matrix"]["labels"], classes["confusion_matrix"]["matrix"]
    if len(names) > PRINTED_CLASSES:  # too wide for a terminal: the mistakes made most often instead
        mistakes = sorted(((matrix[i][j], truth, answer) for i, truth in enumerate(names)
                           for j, answer in enumerate(names) if i != j and matrix[i][j]), key=lambda m: -m[0])
        shown = ", ".join(f"{truth} as {answer} ({n})" for n, truth, answer in mistakes[:5]) or "none"
        out.append(("confusion matrix", f"{len(names)} classes, the whole matrix in report.json and confusion.png "
                                        f"of a train run; the commonest mistakes: {shown}"))
        return out
    width = max(max(len(str(n)) for n in names), max(len(str(v)) for r in matrix for v in r))
    out.append(("confusion matrix", "rows: truth, columns: answer"))
    out.append(("", " ".join(f"{n:>{width}}" for n in names)))
    for name, row in zip(names, matrix):
        out.append((f"  {name}", " ".join(f"{v:>{width}}" for v in row)))
    return out
