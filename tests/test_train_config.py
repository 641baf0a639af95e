"""lorakit.train_config: every setting of a run, its help beside it, defaults written once."""

from dataclasses import fields

import pytest

from lorakit import LorakitError
from lorakit.methods import METHODS
from lorakit.tasks import TASKS
from lorakit.train_config import TrainConfig


def test_defaults_that_depend_on_the_task_or_the_method_come_from_their_registries():
    for name, task in TASKS.items():
        config = TrainConfig(task=name)
        assert config.eval_batch_size == task.default_eval_batch_size
        assert config.out == f"runs/{name}-lora"
        # what the recipe chooses from the data stays None until training sets up (lorakit.recipe)
        assert (config.max_length, config.batch_size, config.lr, config.steps, config.epochs) == (None,) * 5
    assert TrainConfig(max_length=20, eval_batch_size=2, lr=0.5, out="x").settings()["max_length"] == 20


def test_the_recipe_defaults_are_explained_in_the_flags_help():
    help_of = {f.name: f.metadata["default_help"] for f in fields(TrainConfig)}
    for name, method in METHODS.items():
        assert f"{name} {method.default_lr:g}" in help_of["lr"]()
    assert "classify 600" in help_of["steps"]() and "classify 256" in help_of["max_length"]()


def test_every_field_says_what_it_does_and_whether_a_resume_shares_it():
    assert all(f.metadata["help"] and {"flag", "shared"} <= set(f.metadata) for f in fields(TrainConfig))
    assert set(TrainConfig().settings()) == {f.name for f in fields(TrainConfig)} - {
        "eval_batch_size", "out", "resume", "overwrite", "stop_after", "device", "fsdp", "progress", "compile"}


def test_bad_values_are_refused_with_their_name():
    with pytest.raises(LorakitError, match="warmup must be in \\[0, 1\\), got 1.5"):
        TrainConfig(warmup=1.5)
    with pytest.raises(LorakitError, match="task 'regression' is unknown"):
        TrainConfig(task="regression")
    with pytest.raises(LorakitError, match="for --method adalora"):
        TrainConfig(target_rank=2)
    with pytest.raises(LorakitError, match="--method adalora cannot train with --fsdp"):
        TrainConfig(method="adalora", fsdp=True)
    with pytest.raises(LorakitError, match="--class-weights is for a task with classes; task 'chat' has none"):
        TrainConfig(task="chat", class_weights="balanced")
    with pytest.raises(LorakitError, match="class_weights 'inverse' is unknown"):
        TrainConfig(class_weights="inverse")
