"""The state of a training run: what set-up made (:class:`Run`) and how far it is (:class:`Progress`).

:mod:`lorakit.train`'s phases pass these two between them; a checkpoint records a
:class:`Progress` (with the run's settings) and ``--resume`` restores it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from lorakit import checkpoint, distributed
from lorakit.methods import Method
from lorakit.report import MetricsLog
from lorakit.run_folder import RunFolder
from lorakit.tasks import Task, TaskData, evaluate
from lorakit.train_config import TrainConfig


@dataclass
class Progress:
    """How far the run is: what a checkpoint records (with the settings) and resume restores."""

    step: int = 0  # the step of the last checkpoint
    best: float | None = None  # the best validation metric so far
    best_step: int | None = None
    before: dict | None = None  # validation metrics before training
    train_time_s: float = 0.0  # seconds in the training loop, all sessions together
    wall_time_s: float = 0.0  # seconds since the first session started


@dataclass
class Run:
    """Everything :func:`lorakit.train.set_up` made, which the other phases use."""

    config: TrainConfig
    runtime: distributed.Runtime
    task: Task
    method: Method
    folder: RunFolder
    model: torch.nn.Module
    tokenizer: object
    data: TaskData
    bf16: bool
    params: list  # the trainable parameters
    trainable: int  # their count
    total: int  # parameters of the model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    global_batch: int  # examples per optimizer step, all processes together
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    started: float  # perf_counter() when the (first) session started
    ddp_model: torch.nn.Module | None = None  # the model as the step calls it (DDP-wrapped under torchrun)
    log: MetricsLog | None = None  # rank 0 only
    bar: object = None
    start_step: int = 0
    loop_started: float = 0.0
    lengths: tuple = field(default=(), repr=False)
    loss_options: dict = field(default_factory=dict)  # e.g. class_weights, given to Task.batch_stats / batch_count
    choices: list = field(default_factory=list)  # what lorakit.recipe chose (recipe.Choice)
    data_fingerprint: str | None = None  # of the data file read (lorakit.data.files.file_fingerprint)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def say(self, *args) -> None:
        if self.runtime.is_main:
            print(*args)

    def autocast(self):
        return torch.autocast(self.runtime.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def evaluate(self, examples, detail: bool = False) -> dict:
        """The task's metrics on ``examples``; ``detail``: with the breakdown by class (what the figures draw)."""
        with self.autocast():
            return evaluate(self.task, self.model, examples, self.pad_id, self.config.eval_batch_size,
                            self.runtime.device, self.runtime.rank, self.runtime.world_size,
                            labels=self.data.labels if detail else None, detail=detail)

    def start_loop(self, progress: Progress) -> None:
        self.start_step = progress.step
        self.loop_started = time.perf_counter() - progress.train_time_s
        self.bar = _progress_bar(self.config.progress and self.runtime.is_main, progress.step, self.total_steps)

    def log_step(self, step: int, **metrics) -> None:
        if self.log:
            self.log.write(step=step, **metrics, elapsed_s=round(time.perf_counter() - self.loop_started, 3))
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        self.bar.update(1)

    def save_checkpoint(self, progress: Progress) -> None:
        """Write a checkpoint of ``progress`` into the run folder (every process calls it; rank 0 writes)."""
        rng_states = distributed.gather_objects(checkpoint.rng_state(), self.runtime)
        params = distributed.trainable_state(self.model)  # whole on rank 0 (gathered under FSDP)
        optimizer_state = distributed.optimizer_state(self.model, self.optimizer)
        if self.runtime.is_main:
            meta = {**asdict(progress), "settings": self.config.settings(), "total_steps": self.total_steps,
                    "data_fingerprint": self.data_fingerprint}
            method_state = self.method.state(self.model, self.total_steps) if self.method.state else None
            checkpoint.save_checkpoint(self.folder.checkpoint, params, optimizer_state, self.scheduler, rng_states,
                                       meta, method_state)
        distributed.barrier(self.runtime)

    def load_checkpoint(self) -> Progress:
        """Restore the run folder's checkpoint (every process calls it); its progress."""
        meta = checkpoint.load_checkpoint(self.folder.checkpoint, self.model, self.optimizer, self.scheduler,
                                          self.runtime.rank)
        if self.method.load_state:
            self.method.load_state(self.model, meta["method_state"], self.total_steps)
        return Progress(**{key: meta[key] for key in asdict(Progress())})

    def clock(self, progress: Progress, step: int) -> None:
        """Record ``step`` and the time spent so far in ``progress`` (before a checkpoint)."""
        now = time.perf_counter()
        progress.step, progress.train_time_s, progress.wall_time_s = step, now - self.loop_started, now - self.started


def _progress_bar(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="training")
