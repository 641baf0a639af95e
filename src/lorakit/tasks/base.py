"""What every task has, and the work that is the same for all: encoding the splits
(read by :mod:`lorakit.tasks.reading`), evaluating a model.

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
from typing import Callable, ClassVar

import torch

from lorakit import data as lkdata
from lorakit.data.encode import Encoded, EncodedExample, collate
from lorakit.data.stream import EncodedStream, RecordStream
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
    pairs: bool = False  # classification of pairs of texts (records with a text_pair)

    def sizes(self) -> dict:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def train_lengths(self) -> tuple:
        """Tokens of each training example (``()`` for a stream, which is not batched by length)."""
        return () if isinstance(self.train, EncodedStream) else tuple(len(e.input_ids) for e in self.train)


@dataclass(frozen=True, kw_only=True)
class Task:
    """One learning problem. Subclasses (:class:`~lorakit.tasks.classify.ClassificationTask`,
    :class:`~lorakit.tasks.language.LanguageModelTask`) define the behaviour.

    Attributes:
        name: the ``--task`` value.
        metric: the number that picks the best checkpoint (``"accuracy"`` or ``"loss"``).
        higher_is_better: whether a larger ``metric`` is better.
        max_length_cap: the most tokens per example the recipe chooses (:mod:`lorakit.recipe`:
            what a longer example would cost); also the length used where none was recorded.
        default_epochs: passes over the training split when neither ``--steps`` nor
            ``--epochs`` is given.
        fp32_epochs: the passes in place of ``default_epochs`` when the run computes in fp32
            (no bf16: on a CPU without native bf16 a step takes about twice as long), so that
            the default run keeps its time; None: ``default_epochs`` either way.
        min_steps: the recipe's floor on optimizer steps when neither is given (0: none).
        min_examples: the recipe's floor on training examples seen (steps × global batch)
            when neither is given (0: none).
        default_eval_batch_size: examples per evaluation forward pass.
        load_model: ``(spec, labels or None) -> (model, tokenizer)``.
        default_data: ``() -> DatasetSplits`` of the embedded dataset.
        trains_head: the model gets a new head that only training gives it (the base
            model alone is not usable, and adapters with their own heads do not merge).
        has_classes: examples have a class (``--class-weights`` applies).
        smooths_labels: the loss takes ``--label-smoothing`` (a cross-entropy).
        stats: the keys of :meth:`batch_stats`, summed over batches by :func:`evaluate`.
        outputs: keys of :meth:`batch_stats` holding one value per example (``(B,)``),
            gathered by :func:`evaluate` for :meth:`metrics`.
        stratify_key: the record key a file is split by (each value keeps its share).
        group_keys: record keys (the first a file's records hold) whose value keeps records
            together in one part of a split (a repeated text is never both trained on and scored).
    """

    name: str
    metric: str
    higher_is_better: bool
    max_length_cap: int
    default_epochs: float
    default_eval_batch_size: int
    load_model: Callable
    default_data: Callable
    min_steps: int = 0
    min_examples: int = 0
    fp32_epochs: float | None = None

    trains_head: ClassVar[bool] = False
    has_classes: ClassVar[bool] = False
    smooths_labels: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("loss_sum", "count")
    outputs: ClassVar[tuple[str, ...]] = ()
    stratify_key: ClassVar[str | None] = None
    group_keys: ClassVar[tuple[str, ...]] = ()

    #: the model ``"default"`` stands for, and the transformers auto class a config is built
    #: into (what ``lorakit inspect --memory`` builds on fake tensors)
    default_model: ClassVar[str] = "default"
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"
    #: what the task sets on a model's config before building it (as :attr:`load_model` builds it)
    config_settings: ClassVar[dict] = {}

    def fake_batch(self, batch_size: int, length: int) -> dict:
        """A ``(batch_size, length)`` batch of zeros shaped as :meth:`batch_stats` takes it."""
        raise NotImplementedError

    def fake_loss(self, model, batch: dict):
        """The training loss of ``batch`` for a model on fake tensors (no value-dependent shapes)."""
        return self.batch_stats(model, batch)["loss_sum"]

    def epochs(self, bf16: bool) -> float:
        """Passes over the training split of a run whose length the recipe chooses, at this precision."""
        return self.default_epochs if bf16 or self.fp32_epochs is None else self.fp32_epochs

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    # ---- what a task kind defines

    def read_records(self, path, columns: dict | None = None) -> list[dict]:
        """The records of a user's file, checked (see :mod:`lorakit.data.readers`);
        ``columns`` maps a standard key to the user's column name."""
        raise NotImplementedError

    def check_records(self, raw: list[dict], source: str, columns: dict | None = None) -> list[dict]:
        """Raw rows (each with ``"_where"``, e.g. of a saved ``datasets`` folder) checked as records."""
        raise NotImplementedError

    def stream_records(self, path, columns: dict | None, buffer: int, limit: int | None) -> RecordStream:
        """The training records of a file too large to hold (:mod:`lorakit.data.stream`)."""
        raise NotImplementedError

    def labels(self, train, source: str) -> list[str] | None:
        """Class names by index, from the training records; None for a task without classes."""
        return None

    def token_lengths(self, records: list[dict], tokenizer) -> list[int]:
        """Tokens of each record, uncut (what the recipe's length choice reads)."""
        raise NotImplementedError

    def encode(self, records: list[dict], tokenizer, max_length: int, labels: list[str] | None) -> Encoded:
        """Records -> token ids with the training targets."""
        raise NotImplementedError

    def heads(self, model) -> list[str]:
        """Names of the modules trained in full next to an adapter (a classifier's head)."""
        return []

    def start(self, model, data: TaskData) -> None:
        """Set what a new model's head starts from, given the encoded training data (nothing by default)."""

    def batch_stats(self, model, batch: dict, label_smoothing: float = 0.0) -> dict:
        """``{key: 0-d tensor}`` for the keys in :attr:`stats` (``loss_sum`` keeps its graph),
        and ``(B,)`` tensors for the keys in :attr:`outputs`."""
        raise NotImplementedError

    def batch_count(self, examples: list[EncodedExample], **loss_options) -> float:
        """What a batch's summed loss is divided by: its examples or trained tokens (the
        ``count`` that :meth:`batch_stats` returns, known before the forward pass)."""
        return float(sum(e.target_count() for e in examples))

    def metrics(self, sums: dict[str, float], examples: int, outputs: dict | None = None,
                labels: list[str] | None = None, detail: bool = False) -> dict:
        """The metrics of summed :meth:`batch_stats` and the gathered :attr:`outputs`:
        ``{"loss", "examples", ...}``; with ``labels`` (class names) also a breakdown by class, with
        ``detail`` what :meth:`figures` draws (the final report's)."""
        raise NotImplementedError

    def figures(self, metrics: dict, folder, split: str) -> dict[str, str]:
        """Draw what :meth:`metrics` (with ``detail``) of ``split`` show best as a picture into the run
        ``folder`` (:class:`lorakit.run_folder.RunFolder`): ``{report key: path}`` of each figure drawn."""
        return {}

    def verdict(self, metrics: dict, split: str, advise: bool = True) -> str | None:
        """A warning line when ``metrics`` show the model learned nothing a trivial answer
        would not do as well (a classifier against its majority class); else None. ``advise=False``:
        without what to try (a :meth:`why` line says it)."""
        return None

    def why(self, train_losses: list[float], validation: dict, train, labels, lr: float,
            weighted: bool) -> str | None:
        """After a :meth:`verdict`'s warning: a line saying why, from the run's training losses and its
        ``validation`` metrics; None where the task cannot tell."""
        return None

    def report_rows(self, split: str, metrics: dict) -> list[tuple[str, str]]:
        """``(name, value)`` lines of the final report for ``metrics`` of ``split``."""
        value = metrics.get(self.metric)
        return [(f"{split} {self.metric}", "n/a" if value is None else f"{value:.4f}")]

    def predict(self, model, tokenizer, texts: list, labels, max_length: int, pairs: bool = False,
                batch_size: int | None = None, progress: str | None = None) -> list[dict]:
        """``[{"text", "label", "probabilities"}]`` of each text (classification; ``pairs``: each text a
        tab-separated pair), ``batch_size`` texts a forward pass, with a ``progress`` bar of that title."""
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


def encode_splits(task: Task, splits: lkdata.DatasetSplits, tokenizer, max_length: int,
                  labels: list[str] | None = None, allow_empty_train: bool = False) -> TaskData:
    """Tokenize the three splits; warn once when examples were truncated.

    ``labels`` (class names by index) default to the task's labels of the training split.

    Raises:
        LorakitError: a validation or test label absent from ``labels``; no training example.
    """
    labels = labels or task.labels(splits.train, splits.source)
    streamed = isinstance(splits.train, RecordStream)
    train = [] if streamed else splits.train
    parts: list[Encoded] = [task.encode(p, tokenizer, max_length, labels)
                            for p in (train, splits.validation, splits.test)]
    truncated = sum(p.truncated for p in parts)
    dropped = sum(p.dropped for p in parts)
    pairs = any("text_pair" in p[0] for p in (train, splits.validation, splits.test) if p)
    total = sum(len(p) for p in (train, splits.validation, splits.test))
    if truncated:
        longest = max(p.longest for p in parts)
        note = f"; {dropped} of them had no trained token left and were dropped" if dropped else ""
        warnings.warn(f"{truncated} of {total} examples were longer than max_length={max_length} tokens and were "
                      f"truncated (longest: {longest} tokens){note}; raise --max-length to keep more",
                      TruncationWarning, stacklevel=2)
    elif dropped:
        warnings.warn(f"{dropped} of {total} examples had no token to learn from and were dropped (each token is "
                      "predicted from those before it, so a completion needs a prompt or a second token)",
                      TruncationWarning, stacklevel=2)
    if streamed:
        def encode(records):
            return task.encode(records, tokenizer, max_length, labels).examples

        return TaskData(EncodedStream(splits.train, encode), parts[1].examples, parts[2].examples, splits.source,
                        labels, truncated, dropped, pairs)
    if not allow_empty_train:  # training: examples to learn from, and to choose the best checkpoint on
        for part, name in ((parts[0], "training"), (parts[1], "validation")):
            if not part.examples:
                raise LorakitError(f"{splits.source} leaves no {name} example after tokenization; give more data "
                                   f"(or a {name} file in a data folder)")
    return TaskData(parts[0].examples, parts[1].examples, parts[2].examples, splits.source, labels, truncated,
                    dropped, pairs)


# ---------------------------------------------------------------- metrics


@torch.no_grad()
def evaluate(task: Task, model, examples: list[EncodedExample], pad_id: int, batch_size: int = 64,
             device="cpu", rank: int = 0, world_size: int = 1, labels: list[str] | None = None,
             progress: str | None = None, detail: bool = False) -> dict:
    """The task's metrics of ``model`` on ``examples`` (:meth:`Task.metrics`).

    Examples are batched in order of length (less padding). Under torch.distributed
    each process takes every ``world_size``-th batch and the sums are all-reduced, so
    every process returns the same numbers; every process runs as many forward passes
    (one left without a batch runs the shortest one and does not count it), since a model
    sharded with FSDP gathers its weights from all processes in each forward.
    The per-example outputs are gathered too.

    Args:
        labels: class names by index: the metrics then include a breakdown by class
            (per-class precision and recall, the confusion matrix).
        progress: a progress bar's title (shown on stderr), or None for none.
        detail: with what the task's figures draw (:meth:`Task.figures`).

    Returns:
        e.g. ``{"loss": nats per example, "examples": n, "accuracy", "macro_f1",
        "majority_accuracy", "majority_macro_f1"}`` (classify) or ``{"loss": nats per
        token, "examples": n, "perplexity": exp(loss)}`` (language models).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(len(task.stats), dtype=torch.float64)
    outputs: dict[str, list] = {key: [] for key in task.outputs}
    mine, rounds = batches[rank::world_size], -(-len(batches) // world_size)
    steps = range(rounds)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=progress, unit="batch", leave=False, disable=None)
    for i in steps:
        batch = collate([examples[j] for j in (mine[i] if i < len(mine) else batches[0])], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        stats = task.batch_stats(model, batch)
        if i < len(mine):
            totals += torch.tensor([float(stats[key]) for key in task.stats], dtype=torch.float64)
            for key in task.outputs:
                outputs[key].append(stats[key].detach().cpu())
    gathered = {key: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long) for key, parts in outputs.items()}
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
        for key, values in gathered.items():
            parts = [None] * world_size
            dist.all_gather_object(parts, values)
            gathered[key] = torch.cat(parts)
    model.train(was_training)
    return task.metrics(dict(zip(task.stats, totals.tolist())), len(examples),
                        {key: values.numpy() for key, values in gathered.items()}, labels, detail)
