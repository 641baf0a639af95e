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
        assert (config.max_length, config.eval_batch_size) == (task.default_max_length, task.default_eval_batch_size)
        assert config.out == f"runs/{name}-lora"
    for name, method in METHODS.items():
        assert TrainConfig(method=name).lr == method.default_lr
    assert TrainConfig(max_length=20, eval_batch_size=2, lr=0.5, out="x").settings()["max_length"] == 20


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
