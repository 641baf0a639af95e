"""The recipe: what a training run does where its user did not say, chosen from the data.

The settings it chooses are the :class:`~lorakit.train_config.TrainConfig` fields whose
default is None ("the recipe chooses"): the batch, the learning rate, the tokens per
example, and the length of the run (``steps`` / ``epochs``). A value the user gives (a
flag) is kept as given, and each choice made here is printed as one line saying what
and why. The rules, with their constants below:

- **batch** (global: all processes and accumulation steps together): the largest of
  32, 16 and 8 with which the task's epochs reach its step floor; 8 when none does.
  Never more than the training examples.
- **steps**: the task's epochs at that batch, but at least the task's floor
  (``Task.min_steps``: 600 for classification: a new head starts on the majority-class
  plateau, 50-100 steps on the reviews, 300-400 on 480 drug reviews, docs/training.md),
  unless the floor would take more than :data:`MAX_EPOCHS` epochs.
- **lr**: the method's rate (``Method.default_lr``), at any of these batches: measured at
  batch 32 on the reviews and at batch 8 on the drug reviews, where half of it (the
  square-root rule for Adam, ``sqrt(8/32)``) had not left the plateau after 300 steps.
- **max_length**: the 99th percentile of the training examples' token lengths (all of
  them, or a seeded sample of :data:`SAMPLE_SIZE`), rounded up to a multiple of 16; at
  most the model's limit and the task's cap (``Task.max_length_cap``: what longer
  examples would cost), at least 16.

For the default task (10,752 Rotten Tomatoes reviews) this gives what was measured
before the recipe existed: batch 32, 3 epochs = 1,008 steps, lr 1e-3, max length 64.
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


@dataclass(frozen=True)
class Choice:
    """One setting the recipe chose: its name, value and the reason, for the printed line."""

    name: str
    value: object
    reason: str

    def line(self) -> str:
        value = f"{self.value:g}" if isinstance(self.value, float) else str(self.value)
        return f"recipe: {self.name} {value}: {self.reason} (--{self.name.replace('_', '-')} to set)"


def choose(config, task, method, train, tokenizer, model, world_size: int = 1):
    """``config`` with its batch, learning rate and max length filled in, and the choices made.

    Args:
        config: a :class:`~lorakit.train_config.TrainConfig` (None fields: the recipe's).
        task, method: the run's :class:`~lorakit.tasks.Task` and :class:`~lorakit.methods.Method`.
        train: the training records (a list, or a :class:`~lorakit.data.stream.RecordStream`).
        tokenizer, model: the model's, for token lengths and its length limit.
        world_size: processes; the batch is chosen for all of them together.

    Returns:
        ``(config, [Choice, ...])``.
    """
    choices, changes = [], {}
    n = len(train)
    per_step = config.grad_accum * world_size
    if config.batch_size is None:
        target, reason = global_batch_for(n, task)
        changes["batch_size"] = max(1, math.ceil(target / per_step))
        shown = f" ({changes['batch_size']} per forward pass)" if per_step > 1 else ""
        choices.append(Choice("batch_size", target, reason + shown))
    if config.lr is None:
        changes["lr"] = method.default_lr
        choices.append(Choice("lr", method.default_lr, f"the {method.name} method's rate"))
    if config.max_length is None:
        changes["max_length"], reason = max_length_for(task, sample_records(train), tokenizer, model)
        choices.append(Choice("max_length", changes["max_length"], reason))
    return replace(config, **changes), choices


def global_batch_for(n: int, task) -> tuple[int, str]:
    """``(global batch, why)`` for ``n`` training examples: the largest of :data:`BATCHES`
    with which the task's epochs reach its step floor (whatever ``--steps`` or ``--epochs``
    say, so that the batch depends on the data's size alone)."""
    epochs, floor = task.default_epochs, task.min_steps
    for batch in BATCHES:
        if n // batch * epochs >= floor and batch <= n:
            why = f"{n:,} training examples" + (f": {epochs:g} epochs at batch {batch} reach the floor of {floor} "
                                                f"steps" if floor else "")
            return batch, why
    batch = min(BATCHES[-1], n)
    return batch, f"{n:,} training examples, too few for {floor} steps in {epochs:g} epochs at a larger batch"


def run_length(config, task, n: int, global_batch: int) -> tuple[int, Choice | None]:
    """``(optimizer steps, the choice or None)`` of a run over ``n`` examples at ``global_batch``.

    ``--steps`` is kept; ``--epochs`` is turned into steps; otherwise the task's epochs,
    raised to the task's floor (at most :data:`MAX_EPOCHS` epochs).
    """
    steps_per_epoch = max(1, n // global_batch)
    if config.steps:
        return config.steps, None
    if config.epochs:
        return max(1, round(config.epochs * steps_per_epoch)), None
    by_epochs = max(1, round(task.default_epochs * steps_per_epoch))
    floor = min(task.min_steps, MAX_EPOCHS * steps_per_epoch)
    if by_epochs >= floor:
        return by_epochs, Choice("steps", by_epochs, f"the task's {task.default_epochs:g} epochs of {steps_per_epoch} "
                                                     f"steps" + (f" (above the floor of {task.min_steps})"
                                                                 if task.min_steps else ""))
    capped = f", capped at {MAX_EPOCHS} epochs" if floor < task.min_steps else ""
    return floor, Choice("steps", floor, f"{floor / steps_per_epoch:.1f} epochs: the task's "
                                         f"{task.default_epochs:g} epochs would be only {by_epochs} steps, under the "
                                         f"floor of {task.min_steps}{capped}")


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
