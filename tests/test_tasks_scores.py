"""lorakit.tasks.scores and the classifier's metrics: scikit-learn's numbers, the majority
baseline beside them, and a plain warning when a model does not beat it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from lorakit.tasks import evaluate, get_task
from lorakit.tasks.scores import breakdown, rows, scores, shares_loss, verdict, why
from tiny_training import save_tiny_classifier

TARGET = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 0, 0, 1, 0, 2, 1, 0, 2, 2])


def test_scores_equal_scikit_learns_on_known_predictions():
    got = scores(TARGET, PREDICTED)
    assert got["accuracy"] == accuracy_score(TARGET, PREDICTED) == 0.7
    assert got["macro_f1"] == pytest.approx(f1_score(TARGET, PREDICTED, average="macro"))
    # the baseline always answers class 0, the most frequent: 6 of 10
    assert got["majority_accuracy"] == 0.6
    assert got["majority_macro_f1"] == pytest.approx(f1_score(TARGET, np.zeros(10), average="macro", zero_division=0))
    assert got["majority_macro_f1"] == pytest.approx((2 * 0.6 / 1.6) / 3)  # F1 of class 0, the others 0


def test_the_breakdown_names_each_class_and_the_confusion_matrix():
    got = breakdown(TARGET, PREDICTED, ["a", "b", "c"])
    assert got["majority_class"] == "a"
    assert got["per_class"]["b"] == {"precision": pytest.approx(precision_score(TARGET, PREDICTED, labels=[1],
                                                                                average="macro")),
                                     "recall": pytest.approx(recall_score(TARGET, PREDICTED, labels=[1],
                                                                          average="macro")),
                                     "f1": pytest.approx(0.5), "support": 2}
    assert got["confusion_matrix"] == {"labels": ["a", "b", "c"],
                                       "matrix": confusion_matrix(TARGET, PREDICTED).tolist()}
    assert got["confusion_matrix"]["matrix"][0] == [4, 1, 1]  # truth a: 4 right, once b, once c


def test_a_model_that_always_answers_one_class_is_told_so():
    for constant in (0, 2):  # the majority class, or any other
        metrics = {**scores(TARGET, np.full(10, constant)), "classes": breakdown(TARGET, np.full(10, constant),
                                                                                 ["a", "b", "c"])}
        line = verdict(metrics, "test")
        assert line.startswith("warning: test accuracy") and "always answering 'a' (0.600)" in line
    assert verdict(scores(TARGET, TARGET), "test") is None
    # better accuracy but macro-F1 no better than the baseline's is still said
    assert "macro-F1" in verdict({"accuracy": 0.7, "majority_accuracy": 0.6, "macro_f1": 0.2,
                                  "majority_macro_f1": 0.25}, "validation")


def test_a_model_that_beats_the_baseline_but_never_finds_a_class_is_told_so():
    target = np.array([0] * 12 + [1] * 6 + [2] * 5 + [3] * 2)
    predicted = np.array([0] * 12 + [1] * 6 + [0] * 5 + [0] * 2)  # classes 2 (5 examples) and 3 (2) never found
    metrics = {**scores(target, predicted), "classes": breakdown(target, predicted, ["a", "b", "c", "d"])}
    assert metrics["accuracy"] > metrics["majority_accuracy"] and metrics["macro_f1"] > metrics["majority_macro_f1"]
    line = verdict(metrics, "test")
    assert line == ("warning: the model beats always answering 'a' but found none of the test split's 'c' (5 examples)"
                    "; try --class-weights balanced, or more training examples of them")  # 'd': too few to call
    assert verdict(metrics, "test", advise=False).endswith("'c' (5 examples)")
    found = np.array([0] * 12 + [1] * 6 + [2] + [0] * 4 + [0] * 2)  # one of 'c' found: nothing to say
    assert verdict({**scores(target, found), "classes": breakdown(target, found, ["a", "b", "c", "d"])}, "test") is None
    assert verdict(scores(target, predicted), "test") is None  # no breakdown by class: nothing known


def test_why_tells_a_model_that_learned_nothing_from_one_that_fitted_its_training_texts():
    from sklearn.metrics import log_loss

    counts = np.array([6, 3, 1])  # training examples per class
    target = np.array([0, 1, 1, 2, 2])  # the scored split
    shares = counts / counts.sum()
    assert shares_loss(counts) == pytest.approx(-(shares * np.log(shares)).sum())  # the shares' entropy
    assert shares_loss(counts, np.bincount(target, minlength=3)) == pytest.approx(
        log_loss(target, np.tile(shares, (5, 1)), labels=[0, 1, 2]))
    reference = shares_loss(counts)
    stuck = why(0.95 * reference, reference, 1.0, 1.0, 1e-3, weighted=False)
    assert stuck.startswith("why: the training loss ended at") and "--lr 0.0005 or 0.002" in stuck
    assert "--class-weights balanced" in stuck
    assert "--class-weights" not in why(0.95 * reference, reference, 1.0, 1.0, 1e-3, weighted=True)
    fitted = why(0.3 * reference, reference, 0.95, 1.0, 1e-3, weighted=False)
    assert fitted.startswith("why: the training loss fell to") and "check that the labels follow from the texts" in fitted
    assert why(0.85 * reference, reference, 0.95, 1.0, 1e-3, weighted=False) is None  # between the two: unsaid
    assert why(0.3 * reference, reference, 0.5, 1.0, 1e-3, weighted=False) is None  # validation moved: not that


def test_report_rows_put_the_baseline_beside_each_score():
    metrics = {**scores(TARGET, PREDICTED), "classes": breakdown(TARGET, PREDICTED, ["a", "b", "c"])}
    shown = dict(rows("test", metrics))
    assert shown["test accuracy"] == "0.700 (majority-class baseline 0.600)"
    assert shown["class b"].startswith("precision 0.500  recall 0.500")


def test_a_confusion_matrix_too_wide_to_print_names_the_commonest_mistakes():
    names = [f"intent{i}" for i in range(20)]
    target = np.array([i % 20 for i in range(60)])
    predicted = target.copy()
    predicted[[3, 23, 43]] = 7  # intent3 answered as intent7 three times
    predicted[5] = 1
    metrics = {**scores(target, predicted), "classes": breakdown(target, predicted, names)}
    shown = rows("test", metrics)
    assert sum(name.startswith("class ") for name, _ in shown) == 20  # every class's precision and recall
    matrix = dict(shown)["confusion matrix"]
    assert matrix.startswith("20 classes") and matrix.endswith("intent3 as intent7 (3), intent5 as intent1 (1)")
    assert len(shown) == 23  # no row per class of the matrix
    few = {**scores(TARGET, PREDICTED), "classes": breakdown(TARGET, PREDICTED, ["a", "b", "c"])}
    assert dict(rows("test", few))["confusion matrix"] == "rows: truth, columns: answer"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from lorakit.models import load_classifier

    return load_classifier(str(save_tiny_classifier(tmp_path_factory.mktemp("cls"), num_labels=3)),
                           id2label=["a", "b", "c"])


def test_evaluate_of_a_real_model_forced_to_one_class_warns(classifier):
    model, tokenizer = classifier
    task = get_task("classify")
    records = [{"text": t, "label": label, "_where": "x"} for t, label in
               (("good", "a"), ("bad film", "b"), ("the dull movie", "c"), ("fine", "a"), ("great", "a"))]
    examples = task.encode(records, tokenizer, 16, ["a", "b", "c"]).examples
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))  # always 'c'
    metrics = evaluate(task, model, examples, 0, batch_size=2, labels=["a", "b", "c"])
    assert metrics["accuracy"] == 0.2 and metrics["majority_accuracy"] == 0.6
    assert metrics["classes"]["confusion_matrix"]["matrix"] == [[0, 0, 3], [0, 0, 1], [0, 0, 1]]
    assert task.verdict(metrics, "test").startswith("warning: test accuracy 0.200 is no better than always "
                                                    "answering 'a' (0.600)")


def test_balanced_class_weights_weigh_the_loss_as_pytorch_does(classifier):
    model, tokenizer = classifier
    task = get_task("classify")
    train = [{"label": label} for label in ["a"] * 6 + ["b"] * 3 + ["c"]]
    weights = task.class_weights(train, ["a", "b", "c"], "balanced")
    assert weights.tolist() == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])  # n / (k n_c)
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 6 + [1] * 3 + [2])
    assert weights.tolist() == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=y).tolist())
    records = [{"text": t, "label": label, "_where": "x"} for t, label in
               (("good", "a"), ("bad film", "b"), ("the dull movie", "c"), ("fine", "a"))]
    examples = task.encode(records, tokenizer, 16, ["a", "b", "c"]).examples
    from lorakit.data import collate

    batch = collate(examples, 0)
    with torch.no_grad():
        plain = task.batch_stats(model, batch)
        weighted = task.batch_stats(model, batch, class_weights=weights)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits, batch["labels"], weight=weights)
    assert float(weighted["loss_sum"] / weighted["count"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(weighted["count"]) == pytest.approx(task.batch_count(examples, class_weights=weights))
    assert float(weighted["count"]) == pytest.approx(2 * weights[0] + weights[1] + weights[2])
    assert float(plain["loss_sum"] / plain["count"]) == pytest.approx(float(F.cross_entropy(logits, batch["labels"])),
                                                                      rel=1e-5)
    assert float(weighted["loss_sum"] / weighted["count"]) != pytest.approx(float(plain["loss_sum"] / plain["count"]))
