"""The recipe: what a training run does where its user did not say, chosen from the data.

The settings it chooses are the :class:`~lorakit.train_config.TrainConfig` fields whose
default is None ("the recipe chooses"): the batch, the learning rate, the tokens per
example, and the length of the run (``steps`` / ``epochs``). A value the user gives (a
flag) is kept as given, and each choice made here is printed as one line saying what
and why. The rules, with their constants below:

- **batch** (global: all processes and accumulation steps together): the largest of
  32, 16 and 8 with which the task's epochs reach its step floor; 8 when none does.
  Never more than the training examples.
- **steps**: the task's epochs at that batch (``Task.epochs``: the classifier's 3, or 2 where
  the steps run in fp32, about twice as slow on a CPU without native bf16), but at least the task's floor
  (``Task.min_steps``: 600 for classification: a new head starts on the majority-class
  plateau, 50-100 steps on the reviews, 300-400 on 480 drug reviews, docs/training.md) and
  enough steps to see the task's floor of examples (``Task.min_examples``: 9,600 for
  classification, 1,200 steps of 8: on two small datasets LoRA gained 2-8 points of
  validation accuracy, three seeds each, from 600 steps of 8 to 1,200), unless the floor
  would take more than :data:`MAX_EPOCHS` epochs.
- **micro-batches** (``grad_accum``): the global batch is split into 2, 4, ... forward
  passes while one pass's activations, as :func:`lorakit.memory.predict_peak` predicts them
  for this model, method and length, would pass :data:`ACTIVATION_BUDGET`: the same
  optimizer step in less memory (SmolLM2's chat task: 4 passes of 8 instead of one of 32).
- **lr**: the method's rate (``Method.default_lr``; ``Method.short_run_lr`` where the run was
  shortened for fp32: LoRA's 1.5e-3 at 2 epochs), at any of these batches: measured at
  batch 32 on the reviews and at batch 8 on the drug reviews, where half of it (the
  square-root rule for Adam, ``sqrt(8/32)``) had not left the plateau after 300 steps.
- **max_length**: the 99th percentile of the training examples' token lengths (all of
  them, or a seeded sample of :data:`SAMPLE_SIZE`), rounded up to a multiple of 16; at
  most the model's limit and the task's cap (``Task.max_length_cap``: what longer
  examples would cost), at least 16.

For the default task (10,752 Rotten Tomatoes reviews) this gives what was measured
before the recipe existed: batch 32, 3 epochs = 1,008 steps, lr 1e-3, max length 64; in fp32,
2 epochs = 672 steps at lr 1.5e-3.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np

from lorakit.data.stream import RecordStream

BATCHES = (32, 16, 8)  # global batch sizes the recipe picks from, largest first
MAX_EPOCHS = 20  # the step floor never asks for more epochs than this
LENGTH_PERCENTILE = 99
LENGTH_MULTIPLE = 16
MIN_LENGTH = 16
SAMPLE_SIZE = 2000  # training examples whose lengths are measured
SAMPLE_SEED = 1234
ACTIVATION_BUDGET = 2**30  # bytes one forward pass's activations (and allocator slack) may take: a laptop's share


@dataclass(frozen=True)
class Choice:
    """One setting the recipe chose: its name, value and the reason, for the printed line."""

    name: str
    value: object
    reason: str

    def line(self) -> str:
        value = f"{self.value:g}" if isinstance(self.value, float) else str(self.value)
        return f"recipe: {self.name} {value}: {self.reason} (--{self.name.replace('_', '-')} to set)"


def choose(config, task, method, train, tokenizer, model, world_size: int = 1, predict=None, bf16: bool = True):
    """``config`` with its batch, micro-batches, learning rate and max length filled in, and the choices made.

    Args:
        config: a :class:`~lorakit.train_config.TrainConfig` (None fields: the recipe's).
        task, method: the run's :class:`~lorakit.tasks.Task` and :class:`~lorakit.methods.Method`.
        train: the training records (a list, or a :class:`~lorakit.data.stream.RecordStream`).
        tokenizer, model: the model's, for token lengths and its length limit.
        world_size: processes; the batch is chosen for all of them together.
        predict: :func:`lorakit.memory.predict_peak`, to choose the micro-batches (None: one
            pass per step unless ``--grad-accum`` says otherwise).
        bf16: whether the steps run in bf16 (the task's epochs at this precision set the batch).

    Returns:
        ``(config, [Choice, ...])``.
    """
    choices, changes = {}, {}
    n = len(train)
    _check_max_length(config.max_length, model)
    if config.max_length is None:
        changes["max_length"], reason = max_length_for(task, sample_records(train), tokenizer, model)
        choices["max_length"] = Choice("max_length", changes["max_length"], reason)
    if config.batch_size is None:
        target, reason = global_batch_for(n, task, bf16)
        per_pass = max(1, math.ceil(target / ((config.grad_accum or 1) * world_size)))
        if config.grad_accum is None and predict is not None:  # the micro-batches (needs the length above)
            changes["grad_accum"], why = micro_batches(replace(config, **changes), per_pass, predict)
            if why:
                choices["grad_accum"] = Choice("grad_accum", changes["grad_accum"], why)
        changes["batch_size"] = per_pass // changes.get("grad_accum", 1)
        shown = f" ({changes['batch_size']} per forward pass)" if changes["batch_size"] != target else ""
        choices["batch_size"] = Choice("batch_size", target, reason + shown)
    changes.setdefault("grad_accum", config.grad_accum or 1)
    if config.lr is None:
        global_batch = changes.get("batch_size", config.batch_size) * changes["grad_accum"] * world_size
        short = (method.short_run_lr is not None and
                 run_length(config, task, n, global_batch, bf16)[0] < run_length(config, task, n, global_batch)[0])
        changes["lr"] = method.short_run_lr if short else method.default_lr
        choices["lr"] = Choice("lr", changes["lr"], f"the {method.name} method's rate" + (
            f" for the run shortened in fp32 ({method.default_lr:g} at the task's full length)" if short else ""))
    order = ("batch_size", "grad_accum", "lr", "max_length")
    return replace(config, **changes), [choices[name] for name in order if name in choices]


def micro_batches(config, batch: int, predict) -> tuple[int, str | None]:
    """``(forward passes, why or None)``: ``batch`` examples per process split into halves while
    one pass's activations, as ``predict`` (:func:`lorakit.memory.predict_peak`) predicts them,
    would pass :data:`ACTIVATION_BUDGET` (None: one pass does)."""
    from lorakit.errors import LorakitError

    try:
        estimate = predict(replace(config, batch_size=batch, grad_accum=1))
    except LorakitError as err:  # a model the prediction cannot build: one pass, and say why
        return 1, f"one pass of {batch}; {err}"
    per_example = (estimate.activations + estimate.allocator) / batch
    passes = 1
    while per_example * batch / passes > ACTIVATION_BUDGET and batch % (2 * passes) == 0:
        passes *= 2
    if passes == 1:
        return 1, None
    gib = per_example * batch / 2**30
    return passes, (f"{passes} passes of {batch // passes}: one pass of {batch} x {config.max_length} tokens would hold "
                    f"{gib:.1f} GiB of activations (predicted), over the recipe's {ACTIVATION_BUDGET / 2**30:g} GiB")


def global_batch_for(n: int, task, bf16: bool = True) -> tuple[int, str]:
    """``(global batch, why)`` for ``n`` training examples: the largest of :data:`BATCHES`
    with which the task's epochs (at this precision) reach its step floor (whatever ``--steps``
    or ``--epochs`` say, so that the batch depends on the data's size alone)."""
    epochs, floor = task.epochs(bf16), task.min_steps
    for batch in BATCHES:
        if n // batch * epochs >= floor and batch <= n:
            why = f"{n:,} training examples" + (f": {epochs:g} epochs at batch {batch} reach the floor of {floor} "
                                                f"steps" if floor else "")
            return batch, why
    batch = min(BATCHES[-1], n)
    return batch, f"{n:,} training examples, too few for {floor} steps in {epochs:g} epochs at a larger batch"


def run_length(config, task, n: int, global_batch: int, bf16: bool = True) -> tuple[int, Choice | None]:
    """``(optimizer steps, the choice or None)`` of a run over ``n`` examples at ``global_batch``.

    ``--steps`` is kept; ``--epochs`` is turned into steps; otherwise the task's epochs at the
    run's precision (``bf16``), raised to the task's floor (at most :data:`MAX_EPOCHS` epochs).
    """
    steps_per_epoch = max(1, n // global_batch)
    if config.steps:
        return config.steps, None
    if config.epochs:
        return max(1, round(config.epochs * steps_per_epoch)), None
    epochs = task.epochs(bf16)
    precision = (f" in fp32 ({task.default_epochs:g} with bf16, twice as fast where the CPU has it)"
                 if epochs != task.default_epochs else "")
    by_epochs = max(1, round(epochs * steps_per_epoch))
    wanted, floor_text = step_floor(task, global_batch)
    floor = min(wanted, MAX_EPOCHS * steps_per_epoch)
    if by_epochs >= floor:
        return by_epochs, Choice("steps", by_epochs, f"the task's {epochs:g} epochs of {steps_per_epoch} steps"
                                                     + precision + (f" (above the floor of {floor_text})"
                                                                    if wanted else ""))
    capped = f", capped at {MAX_EPOCHS} epochs" if floor < wanted else ""
    return floor, Choice("steps", floor, f"{floor / steps_per_epoch:.1f} epochs: the task's "
                                         f"{epochs:g} epochs{precision} would be only {by_epochs} steps, under the "
                                         f"floor of {floor_text}{capped}")


def step_floor(task, global_batch: int) -> tuple[int, str]:
    """``(steps, how it reads)``: the least steps a run at ``global_batch`` takes when the recipe
    sets its length: the task's ``min_steps``, or the steps that see its ``min_examples`` if more."""
    by_examples = -(-task.min_examples // global_batch)
    if by_examples > task.min_steps:
        return by_examples, f"{by_examples} steps ({task.min_examples:,} examples at batch {global_batch})"
    return task.min_steps, f"{task.min_steps} steps"


def _check_max_length(max_length: int | None, model) -> None:
    """Refuse a ``--max-length`` past the positions a model's learned table holds (longer
    inputs would fail inside its forward pass)."""
    from lorakit.errors import LorakitError
    from lorakit.targets import architecture_name, position_limit

    if max_length is None or model is None:
        return
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise LorakitError(f"--max-length {max_length} is longer than {architecture_name(model)} takes: its learned "
                           f"positions stop at {limit} tokens; give --max-length {limit} or less")


def max_length_for(task, records: list[dict], tokenizer, model) -> tuple[int, str]:
    """``(max length, why)`` from the token lengths of ``records`` (see the module docstring)."""
    lengths = np.asarray(task.token_lengths(records, tokenizer) or [MIN_LENGTH])
    high = int(math.ceil(np.percentile(lengths, LENGTH_PERCENTILE)))
    rounded = max(MIN_LENGTH, -(-high // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
    limit = model_length_limit(model, tokenizer)
    chosen = min(rounded, task.max_length_cap, limit or rounded)
    kept = float((lengths <= chosen).mean())
    reason = (f"{LENGTH_PERCENTILE}% of {len(lengths):,} training examples have at most {high} tokens"
              + (f", rounded up to {rounded}" if rounded != high else ""))
    if chosen < rounded:
        bound = "the model's limit" if limit is not None and chosen == limit else "the task's cost cap"
        reason += f"; cut to {bound} {chosen}"
    return chosen, reason + f"; {100 * kept:.1f}% fit whole"


def model_length_limit(model, tokenizer) -> int | None:
    """The most tokens ``model`` takes: its position embeddings and the tokenizer's limit
    (a tokenizer without one reports a huge placeholder, ignored); None if neither says."""
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def sample_records(train, size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> list[dict]:
    """Up to ``size`` training records, a seeded sample (all of them when fewer; a stream's
    own sample, drawn as it was opened)."""
    if isinstance(train, RecordStream):
        return list(train.sample)
    train = list(train)
    return train if len(train) <= size else random.Random(seed).sample(train, size)


def with_shape(config):
    """``config`` with a batch size and a length: where the recipe would choose them from
    the data (None), the most it may choose (:data:`BATCHES`' largest and the task's
    ``max_length_cap``), so that a memory prediction of it is an upper bound."""
    from lorakit.models import load_model_config
    from lorakit.tasks import get_task

    if config.batch_size is not None and config.max_length is not None:
        return config
    task = get_task(config.task)
    length = config.max_length
    if length is None:
        model_config = load_model_config(task.default_model if config.model == "default" else config.model)
        length = min(task.max_length_cap, getattr(model_config, "max_position_embeddings", None) or task.max_length_cap)
    return replace(config, batch_size=config.batch_size or BATCHES[0], max_length=length)


def check_vocabulary(model, tokenizer, data, name) -> None:
    """Refuse a tokenizer that gives ids past the model's embedding rows (a tokenizer of another
    model, or tokens added without resizing), which would otherwise fail inside the forward."""
    from lorakit.errors import LorakitError

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        return
    parts = [data.validation, data.test] + ([data.train] if isinstance(data.train, list) else [])
    top = max((max(example.input_ids, default=-1) for part in parts for example in part), default=-1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    if max(top, pad) >= rows:
        raise LorakitError(
            f"the tokenizer of model {name!r} ({type(tokenizer).__name__}, {len(tokenizer):,} tokens) gives token id "
            f"{max(top, pad):,}, but the model's embedding has {rows:,} rows; the tokenizer files do not belong to "
            "this model: give the model's own tokenizer (or resize its embeddings to the tokenizer)")
