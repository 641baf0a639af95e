"""Regression: text -> a number (a rating, a similarity score), as transformers' sequence
classifier with one output and ``problem_type="regression"``.

The records are a classifier's (``{"text", "label"}``, or pairs of texts) whose labels are
numbers. The head (``classifier``, ``score``) has one output, trains in full next to the adapter
and is saved with it (PEFT's ``SEQ_CLS``: the base loads with ``num_labels=1``). Loss: squared
error per example (transformers' ``MSELoss`` for ``problem_type="regression"``); the best
checkpoint has the lowest RMSE. Metrics, with scikit-learn and SciPy: RMSE, MAE, R², Pearson's
and Spearman's correlation, beside always answering the scored split's mean (scikit-learn's
``DummyRegressor``: the best any constant answer can do there), and a warning line when the
model does not beat it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lorakit import data as lkdata
from lorakit.data.encode import Encoded
from lorakit.data.labels import number_value
from lorakit.data.stream import EncodedStream
from lorakit.errors import LorakitError
from lorakit.tasks.classify import ClassificationTask, head_outputs, model_inputs

#: the one output's name in the model's config (transformers' own for ``num_labels=1``)
OUTPUT = "LABEL_0"
#: answers explaining less of the labels' variance than this (R²) have learned nothing worth the name
LEARNED_R2 = 0.01
#: the most examples whose answers the final report keeps (and its figure draws)
POINTS = 5_000


@dataclass(frozen=True, kw_only=True)
class RegressionTask(ClassificationTask):
    """A task whose records are ``{"text", "label"}`` with a number as the label, and whose model answers one."""

    metric: str = "rmse"
    higher_is_better: bool = False

    has_classes: ClassVar[bool] = False  # and labels are read as written: "5" and "5.0" are one number anyway
    smooths_labels: ClassVar[bool] = False
    stats: ClassVar[tuple[str, ...]] = ("loss_sum", "count")
    outputs: ClassVar[tuple[str, ...]] = ("predicted", "target")
    stratify_key: ClassVar[str | None] = None
    config_settings: ClassVar[dict] = {"num_labels": 1, "problem_type": "regression"}

    def labels(self, train, source: str) -> None:
        """None (no classes), after checking the training labels: every one a number, not all the same.

        Raises:
            LorakitError: a label that is not a finite number; one value only (nothing to fit).
        """
        values, counts = set(), self.class_counts(train)
        if not counts:  # nothing to train on (scoring a file): nothing to check
            return None
        for name in counts:
            value = number_value(name)
            if value is None:
                raise LorakitError(f"the training split of {source} has the label {name[:40]!r}, which is not a "
                                   "number; --task regress fits numbers (a rating, a score): fix those lines, or "
                                   "train classes with --task classify")
            values.add(value)
        if len(values) < 2:
            raise LorakitError(f"the training split of {source} has only the value {next(iter(values))}; a "
                               "regression needs labels that differ")
        return None

    def class_weights(self, train, labels, rule):
        raise LorakitError(f"--class-weights is for a task with classes; task {self.name!r} fits numbers")

    def encode(self, records, tokenizer, max_length, labels) -> Encoded:
        """The records as examples whose label is the number they spell (float).

        Raises:
            LorakitError: a record whose label is not a finite number (its line is named).
        """
        targets = []
        for record in records:
            value = number_value(str(record["label"]))
            if value is None:
                raise LorakitError(f"{record['_where']}: the label {str(record['label'])[:40]!r} is not a number; "
                                   f"--task regress fits numbers: fix the line or remove it")
            targets.append(float(value))
        return lkdata.encode_texts(records, tokenizer, max_length, targets)

    def start(self, model, data) -> None:
        """The head's output bias starts at the training labels' mean, so the first answers are the mean's
        and not 0 (ratings from 1 to 10 would otherwise cost the first steps to reach their scale); a
        streamed training split (not held) and a head without a bias start as they are."""
        if isinstance(data.train, EncodedStream) or not data.train:
            return
        outputs = [module for name in self.heads(model) for module in model.get_submodule(name).modules()
                   if isinstance(module, torch.nn.Linear) and module.out_features == 1 and module.bias is not None]
        if outputs:
            with torch.no_grad():
                outputs[-1].bias.fill_(float(np.mean([example.label for example in data.train])))

    def fake_batch(self, batch_size, length) -> dict:
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.zeros(batch_size, dtype=torch.float32)}

    def batch_stats(self, model, batch, label_smoothing=0.0, class_weights=None) -> dict:
        """Summed squared error and count of ``batch``, and each example's answer and target."""
        predicted = model(**model_inputs(batch)).logits.float().squeeze(-1)
        target = batch["labels"].float()
        loss = F.mse_loss(predicted, target, reduction="sum")
        return {"loss_sum": loss, "count": torch.tensor(target.numel()), "predicted": predicted.detach(),
                "target": target}

    def batch_count(self, examples, class_weights=None, **loss_options) -> float:
        return float(len(examples))

    def metrics(self, sums, examples, outputs=None, labels=None, detail=False) -> dict:
        """Mean squared error (the loss), and with ``outputs`` the scores of :func:`scores`; with ``detail``
        also ``"points"``: ``{"target", "predicted"}``, at most :data:`POINTS` examples (a seeded sample)."""
        metrics = {"loss": sums["loss_sum"] / max(sums["count"], 1), "examples": examples}
        metrics["rmse"] = math.sqrt(metrics["loss"])
        if outputs is not None:
            metrics.update(scores(outputs["target"], outputs["predicted"]))
            if detail:
                n = len(outputs["target"])
                kept = np.sort(np.random.default_rng(0).permutation(n)[:POINTS])
                metrics["points"] = {key: [float(f"{v:.6g}") for v in np.asarray(outputs[key])[kept]]
                                     for key in ("target", "predicted")}
        return metrics

    def figures(self, metrics, folder, split) -> dict[str, str]:
        """The answers against the truth (``predictions.png``), where ``metrics`` hold their points."""
        if not metrics.get("points"):
            return {}
        from lorakit.plots import plot_predictions

        points = metrics["points"]
        title = f"{split}: answers against the truth (R² {metrics['r2']:.3f})"
        return {"scatter_path": str(plot_predictions(points["target"], points["predicted"], folder.scatter, title))}

    def verdict(self, metrics, split, advise=True) -> str | None:
        """A warning line when the answers explain less than :data:`LEARNED_R2` of the labels' variance."""
        if "mean_rmse" not in metrics or metrics["r2"] >= LEARNED_R2:
            return None
        return (f"warning: {split} RMSE {metrics['rmse']:.4g} is no better than always answering the mean "
                f"({metrics['mean_rmse']:.4g}; R² {metrics['r2']:.3f}): the model has not learned the number from "
                "the texts" + ("; train longer (--steps), or try another --lr" if advise else ""))

    def why(self, train_losses, validation, train, labels, lr, weighted) -> str | None:
        """After a :meth:`verdict`: the end of the training loss against the training labels' variance (what
        always answering their mean scores): still about it, nothing was learned from the texts; far under it
        while the validation loss is not under the validation labels' variance, the texts were memorised."""
        if not train_losses or isinstance(train, EncodedStream) or "mean_rmse" not in validation:
            return None
        variance = float(np.var([example.label for example in train]))
        tail = train_losses[-max(1, len(train_losses) // 10):]
        loss = sum(tail) / len(tail)
        if loss >= 0.9 * variance:
            return (f"why: the training loss ended at {loss:.4g}, not clearly under the {variance:.4g} of always "
                    f"answering the training labels' mean: the model did not learn from the texts; try --lr "
                    f"{lr / 2:g} or {lr * 2:g}, or more --steps")
        if loss < 0.8 * variance and validation["loss"] >= 0.9 * validation["mean_rmse"] ** 2:
            return (f"why: the training loss fell to {loss:.4g}, under the {variance:.4g} of always answering the "
                    f"mean, but the validation loss did not ({validation['loss']:.4g}): the model fitted the training "
                    "texts without learning what carries over; check that the labels follow from the texts")
        return None

    def report_rows(self, split, metrics) -> list[tuple[str, str]]:
        if "mean_rmse" not in metrics:
            return super(ClassificationTask, self).report_rows(split, metrics)
        return [(f"{split} RMSE", f"{metrics['rmse']:.4g} (always answering the mean {metrics['mean_rmse']:.4g})"),
                (f"{split} MAE", f"{metrics['mae']:.4g} (always answering the mean {metrics['mean_mae']:.4g})"),
                (f"{split} R²", f"{metrics['r2']:.3f}"),
                (f"{split} Pearson r", _shown(metrics["pearson"])),
                (f"{split} Spearman ρ", _shown(metrics["spearman"]))]

    def predict(self, model, tokenizer, texts, labels, max_length, pairs: bool = False, batch_size: int | None = None,
                progress: str | None = None) -> list[dict]:
        """The number of each text: ``[{"text", "value"}]`` (as :meth:`ClassificationTask.predict` reads texts)."""
        values = head_outputs(model, tokenizer, texts, max_length, pairs, batch_size or self.default_eval_batch_size,
                              progress)
        return [{"text": text, "value": float(row[0])} for text, row in zip(texts, values)]


def scores(target: np.ndarray, predicted: np.ndarray) -> dict:
    """RMSE, MAE, R² and Pearson's and Spearman's correlation of ``predicted`` against ``target``
    (``(n,)``), and the RMSE and MAE of always answering ``target``'s mean (``DummyRegressor``).

    Returns:
        ``{"rmse", "mae", "r2", "pearson", "spearman", "mean_rmse", "mean_mae"}``; a correlation is
        None where it is undefined (a constant answer or target), R² 0 for a constant target.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.dummy import DummyRegressor
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    target, predicted = np.asarray(target, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(target) == 0:
        return {}
    mean = DummyRegressor(strategy="mean").fit(np.zeros((len(target), 1)), target).predict(np.zeros((len(target), 1)))
    varied = len(target) > 1 and np.ptp(target) > 0 and np.ptp(predicted) > 0
    return {"rmse": float(math.sqrt(mean_squared_error(target, predicted))),
            "mae": float(mean_absolute_error(target, predicted)),
            "r2": float(r2_score(target, predicted)) if np.ptp(target) > 0 else 0.0,
            "pearson": float(pearsonr(target, predicted)[0]) if varied else None,
            "spearman": float(spearmanr(target, predicted)[0]) if varied else None,
            "mean_rmse": float(math.sqrt(mean_squared_error(target, mean))),
            "mean_mae": float(mean_absolute_error(target, mean))}


def _shown(value) -> str:
    return "n/a (a constant answer or target)" if value is None else f"{value:.3f}"


def load_regressor(spec: str, labels=None):
    """``(model, tokenizer)``: a sequence classifier with one output, ``problem_type="regression"``."""
    from lorakit.models import load_classifier

    model, tokenizer = load_classifier(spec, id2label=[OUTPUT])
    model.config.problem_type = RegressionTask.config_settings["problem_type"]
    return model, tokenizer
