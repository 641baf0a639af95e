"""The training loop: LoRA or full fine-tuning of a pretrained model on one task.

Read :func:`_train` top to bottom; it is five phases, each a function below:
:func:`set_up` loads the model and the data, makes the right parameters trainable
(:mod:`lorakit.methods`) and builds AdamW with its schedule (:mod:`lorakit.optimizer`);
:func:`resume` starts afresh or continues a checkpoint; :func:`train_step` is one
optimizer step; every ``eval_every`` steps :func:`evaluate_and_checkpoint` scores the
model, keeps the best weights and writes a checkpoint; :func:`report` restores the best
weights, scores them on the test split and writes the report. What a run writes, and
where, is :mod:`lorakit.run_folder`'s.

Things a user can count on:

- **Resume**: the data order is a function of (seed, epoch) only, and a checkpoint
  holds the trainable weights, AdamW's moments, the scheduler and every process's
  random state, so ``--resume`` continues to the same result as a run never stopped.
  Ctrl-C or SIGTERM stops at the end of the current step and writes a checkpoint.
- **Divergence**: a NaN or infinite loss or gradient stops training before the
  optimizer step; the last good checkpoint is kept.
- **Several processes** (``torchrun``): each takes its slice of every global batch;
  the loss is normalised by the whole global batch's count, so the gradients equal a
  one-process run's with the same global batch. Only rank 0 writes. Each process holds
  the whole model (DDP), or, with ``--fsdp``, a slice of it (:func:`distributed.shard`).
- **The user's files**: ``--out`` must be new, empty or an earlier run's (or
  ``--overwrite``), and nothing lorakit did not write there is deleted.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from lorakit import atomic, chat_templates, checkpoint, distributed, recipe
from lorakit.checkpointing import enable_checkpointing
from lorakit.data.batches import batch_of_step
from lorakit.data.encode import collate
from lorakit.data.files import file_fingerprint
from lorakit.errors import LorakitError
from lorakit.layers.fused import settle
from lorakit.memory import predict_peak
from lorakit.methods import frozen_to_bf16, get_method
from lorakit.optimizer import build_optimizer, warmup_cosine
from lorakit.quantize import quantize_base
from lorakit.report import (
    MetricsLog,
    StepMemory,
    folder_size,
    format_report,
    peak_memory_bytes,
    read_metrics,
)
from lorakit.run_folder import TASK_FILE, RunFolder
from lorakit.targets import lora_layers
from lorakit.tasks import Task, encode_splits, get_task, read_splits
from lorakit.tokens import token_ids
from lorakit.train_config import EVALUATIONS_PER_RUN, TrainConfig
from lorakit.train_state import Progress, Run

__all__ = ["TrainConfig", "TrainingDiverged", "TrainingInterrupted", "train", "warmup_cosine"]


class TrainingDiverged(LorakitError):
    """The loss or a gradient became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C, SIGTERM or ``stop_after``; a checkpoint was written first."""


def train(config: TrainConfig) -> dict:
    """Fine-tune, evaluate and save; return the report (also written to ``report.json``).

    Raises:
        LorakitError: bad settings or data (before training starts), an ``out`` folder
            lorakit did not write, a resume that does not match its checkpoint, or
            :class:`TrainingDiverged`.
        TrainingInterrupted: Ctrl-C, SIGTERM or ``stop_after``; the checkpoint is saved.
    """
    started = time.perf_counter()
    runtime = distributed.setup(config.device, fsdp=config.fsdp)
    try:
        return _train(config, runtime, started)
    finally:
        distributed.teardown(runtime)


def _train(config: TrainConfig, runtime: distributed.Runtime, started: float) -> dict:
    run = set_up(config, runtime, started)
    progress = resume(run)
    step = progress.step
    with checkpoint.stop_on_signals() as stop_requested, StepMemory() as memory:
        run.start_loop(progress)
        while step < run.total_steps:
            with memory.measuring():
                loss, grad_norm, lr = train_step(run, progress, step)
            step += 1
            run.log_step(step, loss=loss, lr=lr, grad_norm=grad_norm)
            if step % run.eval_every == 0 or step == run.total_steps:
                evaluate_and_checkpoint(run, progress, step)
            stopping = config.stop_after is not None and step - run.start_step >= config.stop_after
            if distributed.any_rank(stop_requested.is_set() or stopping, runtime):
                stop_with_checkpoint(run, progress, step)
    run.bar.close()
    return report(run, progress, train_time=time.perf_counter() - run.loop_started, train_peak=memory.peak_bytes)


# ---------------------------------------------------------------- phase 1: set-up


def set_up(config: TrainConfig, runtime: distributed.Runtime, started: float) -> Run:
    """Check ``--out``, load the data and the model, make the right parameters
    trainable, and build the optimizer and its schedule."""
    task, method = get_task(config.task), get_method(config.method)
    folder = RunFolder.claim(config.out, config.overwrite)
    torch.manual_seed(config.seed)
    splits = read_splits(task, config.data, config.data_limit, config.columns(), config.stream, config.stream_buffer)
    fingerprint = file_fingerprint(config.data)  # eval without --data re-splits the file: only if unchanged
    labels = task.labels(splits.train, splits.source)
    model, tokenizer = task.load_model(config.model, labels)
    chat_templates.apply(tokenizer, config.chat_template)  # before lengths are measured: it renders the chats
    if config.trainable_tokens:  # tokens as ids, so a resume compares the same settings
        config = replace(config, trainable_tokens=token_ids(tokenizer, config.trainable_tokens))
    if config.model_dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.model_dropout
    bf16 = distributed.run_in_bf16(config.bf16, runtime.device)
    config, choices = recipe.choose(config, task, method, splits.train, tokenizer, model, runtime.world_size,
                                    predict=predict_peak, bf16=bf16)
    data = encode_splits(task, splits, tokenizer, config.max_length, labels)
    task.start(model, data)
    recipe.check_vocabulary(model, tokenizer, data, config.model)
    sizes = data.sizes()
    loss_options = {}
    if config.class_weights:
        loss_options["class_weights"] = task.class_weights(splits.train, labels, config.class_weights)
    if runtime.is_main:
        print(f"data: {data.source}: {sizes['train']} train, {sizes['validation']} validation, "
              f"{sizes['test']} test examples{' (pairs of texts)' if data.pairs else ''}")

    model = method.prepare(model, config, task.heads(model))
    if bf16 and method.frozen_in_bf16:
        frozen_to_bf16(model)
    # FSDP: before the optimizer takes the parameters, and before .to(): a block at a time goes to the device
    units = distributed.shard(model, runtime)
    model.to(runtime.device).train()
    if config.quantize:
        described = quantize_base(model, config.quantize).describe()
        if runtime.is_main:
            print(described)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.compile:  # in place: the module, its paths and state-dict keys stay the user's
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    if runtime.is_main:
        print(f"{config.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"
              f"{_adapted(model, config)}")
        if runtime.sharded:
            print(f"fsdp: sharded over {runtime.world_size} processes, {len(units)} blocks and the rest of the model")
        elif config.fsdp:
            print("note: --fsdp shards the model over the processes torchrun starts; alone, it trains as usual")

    global_batch = config.batch_size * config.grad_accum * runtime.world_size
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        raise LorakitError(f"the training split has {len(data.train)} examples, fewer than one global batch of "
                           f"{global_batch}; lower --batch-size or --grad-accum")
    total_steps, length_choice = recipe.run_length(config, task, len(data.train), global_batch, bf16)
    choices += [length_choice] if length_choice else []
    if runtime.is_main:
        print("\n".join(choice.line() for choice in choices))
    optimizer, scheduler = build_optimizer(model, config.lr, config.weight_decay, config.warmup, total_steps,
                                           config.loraplus_ratio)
    return Run(config, runtime, task, method, folder, model, tokenizer, data, bf16, params, trainable, total,
               optimizer, scheduler,
               global_batch, steps_per_epoch, total_steps,
               # ceil: the last evaluation falls on the last step, not a few steps before it as well
               eval_every=config.eval_every or max(1, math.ceil(total_steps / EVALUATIONS_PER_RUN)), started=started,
               lengths=data.train_lengths(), loss_options=loss_options, choices=choices,
               data_fingerprint=fingerprint)


# ---------------------------------------------------------------- phase 2: resume


def resume(run: Run) -> Progress:
    """A fresh start, or the progress of the checkpoint in ``--out`` (``--resume``); then
    the metrics log, and the validation metrics before training."""
    config, runtime, folder = run.config, run.runtime, run.folder
    progress = Progress()
    if config.resume:
        checkpoint.check_settings(folder.checkpoint, config.settings(), run.data_fingerprint)
        progress = run.load_checkpoint()
        run.started -= progress.wall_time_s  # report the time of all sessions together
        run.say(f"resuming from step {progress.step} of {run.total_steps} ({folder.checkpoint})")
    elif folder.has_checkpoint():
        run.say(f"note: starting afresh in {folder.root}; --resume would have continued its checkpoint")
    if runtime.rank > 0 and not config.resume:
        torch.manual_seed(config.seed + runtime.rank)  # each process its own dropout masks
    run.ddp_model = distributed.wrap(run.model, runtime)
    # q/k/v, gate/up learn that they share an input here, so fresh and resumed runs compute alike
    settle(run.model, lambda: run.evaluate(run.data.validation[:1]))
    if runtime.is_main:
        folder.mark()
        run.log = MetricsLog(folder.metrics, keep_until_step=progress.step)
    if progress.before is None:
        progress.before = run.evaluate(run.data.validation)
        if run.log:
            run.log.write(step=0, split="validation", **progress.before)
    run.say(f"validation before training: {_show(run.task, progress.before)}")
    return progress


# ---------------------------------------------------------------- phase 3: one step


def train_step(run: Run, progress: Progress, step: int) -> tuple[float, float, float]:
    """Optimizer step ``step`` (0-based) on its global batch; returns ``(loss, gradient
    norm, learning rate)``, the loss per example or trained token of the whole batch.

    Raises:
        TrainingDiverged: the loss or the gradient norm is not finite (nothing is updated).
    """
    config, runtime = run.config, run.runtime
    examples = batch_of_step(run.data.train, run.lengths, step, run.steps_per_epoch, run.global_batch, config.seed,
                             config.group_by_length)
    count = run.task.batch_count(examples, **run.loss_options)  # the whole global batch's (summed class weights)
    mine = examples[runtime.rank::runtime.world_size]
    micro_batches = [mine[i::config.grad_accum] for i in range(config.grad_accum)]
    loss_sum = torch.zeros((), device=runtime.device)
    for i, micro in enumerate(micro_batches):
        batch = {k: v.to(runtime.device) for k, v in collate(micro, run.pad_id).items()}
        last = i == len(micro_batches) - 1
        with distributed.gradient_sync(run.ddp_model, runtime, sync=last):
            with run.autocast():
                stats = run.task.batch_stats(run.ddp_model, batch, config.label_smoothing, **run.loss_options)
            # DDP and FSDP average gradients over processes: scale back to a sum over the global batch
            (stats["loss_sum"] * runtime.world_size / count).backward()
        loss_sum += stats["loss_sum"].detach()
    loss = float(distributed.sum_over_ranks(loss_sum, runtime)) / count
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        kept = f"the last good checkpoint is at step {progress.step} in {run.folder.checkpoint}" if progress.step \
            else "no checkpoint was written yet"
        raise TrainingDiverged(f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm}; "
                               f"{kept}; lower --lr (now {config.lr:g})")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.method.on_step:
        run.method.on_step(run.model, step, run.total_steps)
    return loss, grad_norm, lr


# ---------------------------------------------------------------- phase 4: evaluate and checkpoint


def evaluate_and_checkpoint(run: Run, progress: Progress, step: int) -> None:
    """Score the model on the validation split; if it is the best so far, save it (the
    trained result and the best weights); then write a checkpoint."""
    metrics = run.evaluate(run.data.validation)
    if run.log:
        run.log.write(step=step, split="validation", **metrics)
    if run.runtime.is_main:
        run.bar.write(f"step {step}: validation {_show(run.task, metrics)}")
    if run.task.better(metrics[run.task.metric], progress.best):
        progress.best, progress.best_step = metrics[run.task.metric], step
        save_best(run)
    run.clock(progress, step)
    run.save_checkpoint(progress)


def stop_with_checkpoint(run: Run, progress: Progress, step: int) -> None:
    """Stop at ``step`` (Ctrl-C, SIGTERM, ``stop_after``), with a checkpoint of it."""
    if progress.step != step:
        run.clock(progress, step)
        run.save_checkpoint(progress)
    run.bar.close()
    raise TrainingInterrupted(f"stopped at step {step} of {run.total_steps}; checkpoint saved in "
                              f"{run.folder.checkpoint}; run again with --resume to continue")


def save_best(run: Run) -> None:
    """Keep the best weights: the trainable tensors (to restore them at the end) and
    the exported adapter or model folder, with the task file that ``lorakit eval``,
    ``predict`` and ``generate`` read. Every process calls it; rank 0 writes."""
    with distributed.whole_trainable_parameters(run.model):  # FSDP: gathered onto rank 0
        if run.runtime.is_main:
            _write_best(run)


def _write_best(run: Run) -> None:
    config = run.config
    checkpoint.save_tensors({name: p for name, p in run.model.named_parameters() if p.requires_grad},
                            run.folder.best)

    def absolute(spec: str) -> str:
        return str(Path(spec).resolve()) if spec != "default" and Path(spec).exists() else spec

    task_info = {"task": config.task, "method": config.method, "model": absolute(config.model), "pairs": run.data.pairs,
                 "adapter_name": config.adapter_name, "labels": run.data.labels, "max_length": config.max_length,
                 "data": absolute(config.data), "data_limit": config.data_limit, "columns": config.columns(),
                 "stream": config.stream, "stream_buffer": config.stream_buffer, "data_fingerprint": run.data_fingerprint}

    def write(folder: Path):
        run.method.export(run.model, run.tokenizer, folder, config)
        if config.chat_template:  # the adapter carries the template it was trained with
            chat_templates.save(folder, run.tokenizer)
        atomic.write_json(folder / TASK_FILE, task_info, sort_keys=False)

    run.folder.save_result(run.method.saved_name, write)


# ---------------------------------------------------------------- phase 5: report


def report(run: Run, progress: Progress, train_time: float, train_peak: int) -> dict:
    """Restore the best weights, score them on validation and test, and write the
    report (``report.json``, ``curves.png``, printed)."""
    config, folder = run.config, run.folder
    checkpoint.load_tensors(run.model, folder.best)
    after = run.evaluate(run.data.validation, detail=True)
    test = run.evaluate(run.data.test, detail=True) if run.data.test else None
    saved_to = folder.root / run.method.saved_name
    trainable, total = run.trainable, run.total
    scored, split = (test, "test") if test else (after, "validation")
    result = {
        "task": run.task.name, "metric": run.task.metric, "method": config.method, "model": config.model,
        "rank": config.rank, "alpha": config.alpha, "init_rank": config.init_rank,
        "target_rank": config.target_rank, "targets": _adapted_modules(run.model) or config.targets,
        "data": {"source": run.data.source, **run.data.sizes(), "truncated": run.data.truncated},
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "steps": run.total_steps, "global_batch": run.global_batch, "world_size": run.runtime.world_size,
        "fsdp": run.runtime.sharded,
        "lr": config.lr, "max_length": config.max_length, "bf16": run.bf16, "class_weights": config.class_weights,
        "recipe": {c.name: {"value": c.value, "reason": c.reason} for c in run.choices},
        "validation_before": progress.before, "validation_after": after, "best_step": progress.best_step,
        "test": test, "wall_time_s": time.perf_counter() - run.started, "train_time_s": train_time,
        "memory": {**peak_memory_bytes(run.runtime.device), "train_steps_peak_rss_bytes": train_peak},
        "device": str(run.runtime.device),
        "saved_to": str(saved_to), "saved_bytes": folder_size(saved_to) if saved_to.exists() else 0,
        "metrics_path": str(folder.metrics), "plot_path": str(folder.curves),
        "report_path": str(folder.report), "settings": config.settings(),
        "report_rows": run.task.report_rows(split, scored), "warning": run.task.verdict(scored, split),
    }
    if run.runtime.is_main:
        if test is not None:
            scalars = {k: v for k, v in test.items() if not isinstance(v, dict)}  # no breakdown, no points
            run.log.write(step=progress.step, split="test", **scalars)
        from lorakit.plots import plot_training_curves

        logged = read_metrics(folder.metrics)
        plot_training_curves(logged, folder.curves, metric=run.task.metric)
        if result["warning"]:
            result["why"] = run.task.why([r["loss"] for r in logged if "split" not in r and "loss" in r], after,
                                         run.data.train, run.data.labels, config.lr, bool(config.class_weights))
            if result["why"]:  # its advice instead of the warning's
                result["warning"] = run.task.verdict(scored, split, advise=False)
        result.update(run.task.figures(scored, folder, split))
        atomic.write_json(folder.report, result)
        print(format_report(result))
    return result


def _adapted_modules(model) -> list[str]:
    """Names of the module kinds carrying LoRA factors (``["query", "value"]``), if any."""
    from lorakit.model import lora_layers

    return sorted({path.rsplit(".", 1)[-1] for path, _ in lora_layers(model)})


def _show(task: Task, metrics: dict) -> str:
    parts = [f"{task.metric} {metrics[task.metric]:.4f}"]
    if task.metric != "loss":
        parts.append(f"loss {metrics['loss']:.4f}")
    return ", ".join(parts)


def _adapted(model: torch.nn.Module, config: TrainConfig) -> str:
    """``": LoRA on query, value (12 layers; --targets to change)"`` for a LoRA run; "" for full fine-tuning."""
    paths = [path for path, _ in lora_layers(model)]
    if not paths:
        return ""
    names = ", ".join(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))
    tokens = f", and the rows of {len(config.trainable_tokens)} tokens" if config.trainable_tokens else ""
    tokens += f", and the biases (--bias {config.bias})" if config.bias != "none" else ""
    return f": LoRA on {names} ({len(paths)} layers{'; --targets to change' if config.targets is None else ''}){tokens}"
