"""What is being learned: a registry of tasks, each owning what differs between tasks.

- ``classify``: a sequence classifier (default: the embedded all-MiniLM-L6-v2 on the
  embedded Rotten Tomatoes reviews, ``fresh`` / ``rotten``); metric: accuracy.
- ``regress``: a sequence classifier with one output fitting a number (default: the same
  model on the embedded words rated for pleasantness); metric: RMSE.
- ``chat``: a causal LM on chat turns, only assistant tokens trained (default: the
  embedded SmolLM2-135M-Instruct on the chatterbot corpus); metric: loss per token.
- ``text``: a causal LM on plain text or prompt/completion pairs (default: the same
  model on the review snippets as plain text); metric: loss per token.

A new task is a :class:`ClassificationTask` or :class:`LanguageModelTask` (or another
:class:`Task` subclass) given to :func:`register_task`; the defaults written below are
the only place each task's defaults are written.
"""

from __future__ import annotations

from lorakit import data as lkdata
from lorakit.errors import LorakitError
from lorakit.tasks.base import Task, TaskData, TruncationWarning, encode_splits, evaluate
from lorakit.tasks.classify import ClassificationTask, load_classifier
from lorakit.tasks.language import LanguageModelTask, load_causal_lm, reviews_as_text
from lorakit.tasks.reading import read_splits
from lorakit.tasks.regress import RegressionTask, load_regressor

__all__ = ["TASKS", "ClassificationTask", "LanguageModelTask", "RegressionTask", "Task", "TaskData",
           "TruncationWarning", "encode_splits", "evaluate", "get_task", "per_task", "read_splits", "register_task"]

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` under ``task.name`` (what ``--task`` accepts)."""
    TASKS[task.name] = task
    return task


def per_task(attribute: str, *args) -> str:
    """A default of every registered task, for help texts: ``"classify 3, chat 1, text 1"``
    (``attribute`` a method: its value with ``args``)."""
    values = {name: getattr(task, attribute) for name, task in TASKS.items()}
    return ", ".join(f"{name} {(value(*args) if callable(value) else value):g}" for name, value in values.items())


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LorakitError(f"task {name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name]


# max_length_cap: what the recipe (lorakit.recipe) may choose at most; min_steps: its floor on optimizer steps
# (a classifier's new head starts on the majority-class plateau: 50-100 steps on the reviews, 300-400 on
# 480 drug reviews at batch 8; docs/training.md); min_examples: its floor on examples seen (1,200 steps of 8: LoRA
# gained 2-8 points of validation accuracy on the drug reviews and the debates over 600, docs/training.md); fp32_epochs: 2 where the steps run in fp32, so that the
# default run stays under 5 minutes on a 2-core CPU without bf16 (docs/training.md, "The default run in fp32")
register_task(ClassificationTask(name="classify", load_model=load_classifier, default_data=lkdata.rotten_tomatoes,
                                 max_length_cap=256, default_epochs=3.0, default_eval_batch_size=64, min_steps=600,
                                 min_examples=9_600, fp32_epochs=2.0))
# the classifier's recipe, with one output and a number to fit
register_task(RegressionTask(name="regress", load_model=load_regressor, default_data=lkdata.word_pleasantness,
                             max_length_cap=256, default_epochs=3.0, default_eval_batch_size=64, min_steps=600,
                             min_examples=9_600, fp32_epochs=2.0))
# a language model's logits are (batch, tokens, vocabulary): evaluation batches are kept small
register_task(LanguageModelTask(name="chat", chat=True, load_model=load_causal_lm, default_data=lkdata.chatterbot_pairs,
                                max_length_cap=512, default_epochs=1.0, default_eval_batch_size=8))
register_task(LanguageModelTask(name="text", load_model=load_causal_lm, default_data=reviews_as_text,
                                max_length_cap=512, default_epochs=1.0, default_eval_batch_size=8))
