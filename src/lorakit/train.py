"""The training loop: LoRA or full fine-tuning of a pretrained model on one task.

Read :func:`train` top to bottom: load the model and the data, make the right
parameters trainable (:mod:`lorakit.methods`), build AdamW and a warmup-then-cosine
schedule, then step; every ``eval_every`` steps evaluate, keep the best weights and
write a checkpoint. At the end the best weights are restored, scored on the test split
and saved (a PEFT adapter folder, or a whole model folder for ``--method full``).

Things a user can count on:

- **Resume**: the data order is a function of (seed, epoch) only, and a checkpoint
  holds the trainable weights, AdamW's moments, the scheduler and every process's
  random state, so ``--resume`` continues to the same result as a run never stopped.
  Ctrl-C or SIGTERM stops at the end of the current step and writes a checkpoint.
- **Divergence**: a NaN or infinite loss or gradient stops training before the
  optimizer step; the last good checkpoint is kept.
- **Several processes** (``torchrun``): each takes its slice of every global batch;
  the loss is normalised by the whole global batch's count, so the gradients equal a
  one-process run's with the same global batch. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorakit import checkpoint, distributed
from lorakit.checkpointing import enable_checkpointing
from lorakit.data.batches import batch_of_step
from lorakit.data.encode import collate
from lorakit.errors import LorakitError
from lorakit.methods import get_method, head_modules
from lorakit.quantize import quantize_base
from lorakit.report import MetricsLog, StepMemory, folder_size, format_report, peak_memory_bytes, read_metrics
from lorakit.tasks import TASK_FILE, batch_stats, encode_splits, evaluate, get_task, read_splits

TRAINABLE_INITS = ("gaussian", "kaiming")  # pissa rewrites W: its saved adapter needs that W (not converted yet)
DEFAULT_EPOCHS = {"classify": 3.0}  # tasks not listed train one epoch by default


class TrainingDiverged(LorakitError):
    """The loss or a gradient became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C, SIGTERM or ``stop_after``; a checkpoint was written first."""


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``lorakit train`` flags, same names).

    Attributes:
        task: ``"classify"``, ``"chat"`` or ``"text"`` (:data:`lorakit.tasks.TASKS`).
        model: ``"default"`` (the task's embedded model) or a model folder.
        data: ``"default"`` (the task's embedded dataset), a .jsonl/.csv file, or a
            folder with ``train``/``validation``/``test`` files.
        method: ``"lora"``, ``"full"`` or ``"adalora"`` (:data:`lorakit.methods.METHODS`).
        rank, alpha, targets, lora_dropout: the LoRA adapter (``targets`` None: the
            model family's default, ``query,value`` for BERT, ``q_proj,v_proj`` for Llama).
        init: how A and B start (:data:`lorakit.inits.INITS`: ``"gaussian"``, the seeds'
            A ~ N(0, 1/r²) with B = 0, or ``"kaiming"``, PEFT's default; see :data:`TRAINABLE_INITS`).
        init_rank, target_rank: ``adalora`` only: every adapted matrix starts at rank
            ``init_rank`` (None: ``rank``) and the run ends with ``target_rank`` directions
            per matrix on average (None: ``init_rank // 3``, at least 1), the total budget
            ``target_rank x matrices`` shared out by importance.
        model_dropout: set every dropout of the model to this probability (None: keep
            the model's own, 0.1 for BERT).
        steps / epochs: length of training in optimizer steps, or in passes over the
            training split (one of them; neither: the task's default).
        batch_size: examples per process per forward pass; the global batch of one
            optimizer step is ``batch_size * grad_accum * processes``.
        group_by_length: batch examples of similar length together (less padding).
        lr: peak learning rate (None: the method's default); ``warmup``: fraction of
            the steps spent rising linearly to it, then cosine decay to 0.
        weight_decay: AdamW's decoupled weight decay on matrices (not on biases and norms).
        max_grad_norm: gradients are clipped to this global L2 norm.
        label_smoothing: of the classification cross-entropy (0 = none).
        max_length: tokens per example (None: the task's default); longer ones are cut.
        bf16: mixed precision: forward and backward matrix products in bfloat16
            (``torch.autocast``), weights, gradients and AdamW state in fp32; about 2x
            faster on GPUs and on CPUs with AMX, slower on CPUs without bfloat16 support.
            None (the default): on where the device computes bf16 in hardware
            (:func:`lorakit.distributed.native_bf16`), else fp32. With a method that
            freezes the model (``lora``), the frozen weights are then stored in bf16.
        eval_every: steps between evaluations and checkpoints (None: 5 per run).
        eval_batch_size: examples per evaluation forward pass (None: 64 classify, 8 lm).
        out: output folder (None: ``runs/<task>-<method>``).
        resume: continue from the checkpoint in ``out``.
        seed: seeds the data order, the adapter's init and dropout.
        data_limit: use only this many training examples (quick runs, tests).
        stop_after: stop (as if interrupted, checkpoint written) after this many steps.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: show the tqdm progress bar.
        quantize: store the frozen linear weights as ``"nf4"`` or ``"int8"`` (QLoRA,
            :mod:`lorakit.quantize`); None keeps them as they are. ``--method lora`` only.
        gradient_checkpointing: keep only each block's input for the backward and recompute
            the block there (:mod:`lorakit.checkpointing`): less memory, one more forward of
            the model's body per step.
    """

    task: str = "classify"
    model: str = "default"
    data: str = "default"
    method: str = "lora"
    rank: int = 8
    alpha: float = 16
    init_rank: int | None = None
    target_rank: int | None = None
    targets: list[str] | str | None = None
    lora_dropout: float = 0.0
    init: str = "gaussian"
    model_dropout: float | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    group_by_length: bool = True
    lr: float | None = None
    warmup: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    max_length: int | None = None
    bf16: bool | None = None
    eval_every: int | None = None
    eval_batch_size: int | None = None
    out: str | None = None
    resume: bool = False
    seed: int = 0
    data_limit: int | None = None
    stop_after: int | None = None
    device: str = "auto"
    adapter_name: str = "default"
    progress: bool = True
    quantize: str | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        task, method = get_task(self.task), get_method(self.method)
        if self.steps is not None and self.epochs is not None:
            raise LorakitError(f"give --steps ({self.steps}) or --epochs ({self.epochs}), not both")
        for name in ("rank", "init_rank", "target_rank", "batch_size", "grad_accum", "steps", "max_length", "eval_every", "eval_batch_size",
                     "data_limit", "stop_after"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LorakitError(f"{name} must be a positive integer, got {value!r}")
        for name, low, high in (("alpha", 0, math.inf), ("epochs", 0, math.inf), ("lr", 0, 1.0),
                                ("max_grad_norm", 0, math.inf)):
            value = getattr(self, name)
            if value is not None and not low < value < high:
                raise LorakitError(f"{name} must be in ({low}, {high}), got {value!r}")
        for name in ("warmup", "label_smoothing", "lora_dropout", "model_dropout", "weight_decay"):
            if getattr(self, name) is None:
                continue
            if not 0 <= getattr(self, name) < 1:
                raise LorakitError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.quantize is not None:
            from lorakit.layers.quantized import QUANT_KINDS

            if self.quantize not in QUANT_KINDS:
                raise LorakitError(f"quantize {self.quantize!r} is unknown; choose one of {list(QUANT_KINDS)}")
            if self.method != "lora":
                raise LorakitError(f"--quantize {self.quantize} is for --method lora (it freezes the base weights "
                                   f"under LoRA layers), not {self.method!r}")
        if (self.init_rank is not None or self.target_rank is not None) and self.method != "adalora":
            raise LorakitError(f"--init-rank / --target-rank are for --method adalora, not {self.method!r}")
        if self.target_rank is not None and self.target_rank > (self.init_rank or self.rank):
            raise LorakitError(f"target_rank ({self.target_rank}) must be at most init_rank "
                               f"({self.init_rank or self.rank})")
        from lorakit.inits import INITS

        if self.init not in INITS:
            raise LorakitError(f"init {self.init!r} is unknown; choose one of {sorted(TRAINABLE_INITS)}")
        if self.init not in TRAINABLE_INITS:
            raise LorakitError(f"init {self.init!r} cannot be trained here: its adapter does not apply to the original "
                               f"base model; choose one of {sorted(TRAINABLE_INITS)}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.lr = self.lr if self.lr is not None else method.default_lr
        self.max_length = self.max_length or task.default_max_length
        # a language model's logits are (batch, tokens, vocabulary): keep evaluation batches small
        self.eval_batch_size = self.eval_batch_size or (64 if task.kind == "classify" else 8)
        self.out = self.out or f"runs/{self.task}-{self.method}"

    def settings(self) -> dict:
        """The settings a resume must share with the run it continues."""
        keep = ("task", "model", "data", "method", "rank", "alpha", "init_rank", "target_rank", "targets", "lora_dropout", "init", "model_dropout",
                "steps", "epochs",
                "batch_size", "grad_accum", "group_by_length", "lr", "warmup", "weight_decay", "max_grad_norm", "label_smoothing",
                "max_length", "bf16", "eval_every", "seed", "data_limit", "adapter_name", "quantize")
        return {k: v for k, v in asdict(self).items() if k in keep}


def train(config: TrainConfig) -> dict:
    """Fine-tune, evaluate and save; return the report (also written to ``report.json``).

    Raises:
        LorakitError: bad settings or data (before training starts), a resume that
            does not match its checkpoint, or :class:`TrainingDiverged`.
        TrainingInterrupted: Ctrl-C, SIGTERM or ``stop_after``; the checkpoint is saved.
    """
    started = time.perf_counter()
    runtime = distributed.setup(config.device)
    try:
        return _train(config, runtime, started)
    finally:
        distributed.teardown(runtime)


def _train(config: TrainConfig, runtime: distributed.Runtime, started: float) -> dict:
    task, method = get_task(config.task), get_method(config.method)
    out = Path(config.out)
    say = print if runtime.is_main else (lambda *a, **k: None)

    # ---- 1. model and data
    torch.manual_seed(config.seed)
    splits = read_splits(task, config.data, config.data_limit)
    labels = sorted({r["label"] for r in splits.train}) if task.kind == "classify" else None
    model, tokenizer = task.load_model(config.model, labels)
    if config.model_dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.model_dropout
    data = encode_splits(task, splits, tokenizer, config.max_length, labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    say(f"data: {data.source}: {data.sizes()['train']} train, {data.sizes()['validation']} validation, "
        f"{data.sizes()['test']} test examples")

    # ---- 2. what trains
    model = method.prepare(model, config, head_modules(model) if task.kind == "classify" else [])
    bf16 = config.bf16 if config.bf16 is not None else distributed.native_bf16(runtime.device)
    if bf16 and method.frozen_in_bf16:
        _frozen_to_bf16(model)
    model.to(runtime.device).train()
    if config.quantize:
        say(quantize_base(model, config.quantize).describe())
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    say(f"{config.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")

    # ---- 3. batches, optimizer, schedule
    global_batch = config.batch_size * config.grad_accum * runtime.world_size
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        raise LorakitError(f"the training split has {len(data.train)} examples, fewer than one global batch of "
                           f"{global_batch}; lower --batch-size or --grad-accum")
    if config.steps:
        total_steps = config.steps
    elif config.epochs:
        total_steps = max(1, round(config.epochs * steps_per_epoch))
    else:
        total_steps = max(1, round(DEFAULT_EPOCHS.get(task.name, 1.0) * steps_per_epoch))
    eval_every = config.eval_every or max(1, total_steps // 5)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    warmup_steps = round(config.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps))

    # ---- 4. fresh start or resume
    state_dir, best_file = out / "state" / "last", out / "state" / "best.safetensors"
    state = {"step": 0, "best": None, "best_step": None, "before": None, "train_time_s": 0.0, "wall_time_s": 0.0}
    if config.resume:
        _check_same_settings(checkpoint.read_meta(state_dir)["settings"], config.settings(), state_dir)
        meta = checkpoint.load_checkpoint(state_dir, model, optimizer, scheduler, runtime.rank)
        state.update({k: meta[k] for k in state})
        started -= state["wall_time_s"]  # report the time of all sessions together
        say(f"resuming from step {state['step']} of {total_steps} ({state_dir})")
    elif runtime.is_main and checkpoint.existing_folder(state_dir):
        say(f"note: starting afresh in {out}; --resume would have continued its checkpoint")
    if runtime.rank > 0 and not config.resume:
        torch.manual_seed(config.seed + runtime.rank)  # each process its own dropout masks
    ddp_model = distributed.wrap(model, runtime)
    log = MetricsLog(out / "metrics.jsonl", keep_until_step=state["step"]) if runtime.is_main else None

    def autocast():
        return torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=bf16)

    def validate() -> dict:
        with autocast():
            return evaluate(task, model, data.validation, pad_id, config.eval_batch_size, runtime.device,
                            runtime.rank, runtime.world_size)

    if state["before"] is None:
        state["before"] = validate()
        if log:
            log.write(step=0, split="validation", **state["before"])
    say(f"validation before training: {_show(task, state['before'])}")

    def save_checkpoint(step: int):
        rng_states = distributed.gather_objects(checkpoint.rng_state(), runtime)
        if runtime.is_main:
            meta = {**state, "step": step, "settings": config.settings(), "total_steps": total_steps}
            checkpoint.save_checkpoint(state_dir, model, optimizer, scheduler, rng_states, meta)
        distributed.barrier(runtime)

    # ---- 5. the loop
    bar = _progress(config.progress and runtime.is_main, state["step"], total_steps)
    loop_started = time.perf_counter() - state["train_time_s"]
    step = start_step = state["step"]
    lengths = tuple(len(e.input_ids) for e in data.train)
    with checkpoint.stop_on_signals() as stop_requested, StepMemory() as memory:
        while step < total_steps:
            examples = batch_of_step(data.train, lengths, step, steps_per_epoch, global_batch, config.seed,
                                     config.group_by_length)
            count = sum(e.target_count() for e in examples)  # the whole global batch's
            mine = examples[runtime.rank::runtime.world_size]
            micro_batches = [mine[i::config.grad_accum] for i in range(config.grad_accum)]
            loss_sum = torch.zeros((), device=runtime.device)
            with memory.measuring():
                for i, micro in enumerate(micro_batches):
                    batch = {k: v.to(runtime.device) for k, v in collate(micro, pad_id).items()}
                    last = i == len(micro_batches) - 1
                    with ddp_model.no_sync() if runtime.world_size > 1 and not last else nullcontext():
                        with autocast():
                            stats = batch_stats(task, ddp_model, batch, config.label_smoothing)
                        # DDP averages gradients over processes: scale back to a sum over the global batch
                        (stats["loss_sum"] * runtime.world_size / count).backward()
                    loss_sum += stats["loss_sum"].detach()
                loss = float(distributed.sum_over_ranks(loss_sum, runtime)) / count
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    kept = f"the last good checkpoint is at step {state['step']} in {state_dir}" \
                        if checkpoint.existing_folder(state_dir) else "no checkpoint was written yet"
                    raise TrainingDiverged(f"training diverged at step {step + 1}: loss {loss}, gradient norm "
                                           f"{grad_norm}; {kept}; lower --lr (now {config.lr:g})")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if method.on_step:
                method.on_step(model, step, total_steps)
            step += 1
            if log:
                log.write(step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                          elapsed_s=round(time.perf_counter() - loop_started, 3))
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

            if step % eval_every == 0 or step == total_steps:
                metrics = validate()
                if log:
                    log.write(step=step, split="validation", **metrics)
                if runtime.is_main:
                    bar.write(f"step {step}: validation {_show(task, metrics)}")
                if task.better(metrics[task.metric], state["best"]):
                    state.update(best=metrics[task.metric], best_step=step)
                    if runtime.is_main:
                        _save_trained(method, model, tokenizer, out, config, data, best_file)
                state.update(step=step, train_time_s=time.perf_counter() - loop_started,
                             wall_time_s=time.perf_counter() - started)
                save_checkpoint(step)
            stopping = config.stop_after is not None and step - start_step >= config.stop_after
            if distributed.any_rank(stop_requested.is_set() or stopping, runtime):
                if state["step"] != step:
                    state.update(step=step, train_time_s=time.perf_counter() - loop_started,
                                 wall_time_s=time.perf_counter() - started)
                    save_checkpoint(step)
                bar.close()
                raise TrainingInterrupted(f"stopped at step {step} of {total_steps}; checkpoint saved in "
                                          f"{state_dir}; run again with --resume to continue")
    bar.close()
    train_time = time.perf_counter() - loop_started
    train_steps_peak = memory.peak_bytes

    # ---- 6. best weights back, test, report
    _restore(model, best_file)
    after = validate()
    with autocast():
        test = evaluate(task, model, data.test, pad_id, config.eval_batch_size, runtime.device, runtime.rank,
                        runtime.world_size) if data.test else None
    saved_to = out / method.saved_name
    report = {
        "task": task.name, "metric": task.metric, "method": config.method, "model": config.model,
        "rank": config.rank, "alpha": config.alpha, "init_rank": config.init_rank,
        "target_rank": config.target_rank, "targets": _adapted_modules(model) or config.targets,
        "data": {"source": data.source, **data.sizes(), "truncated": data.truncated},
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "steps": total_steps, "global_batch": global_batch, "world_size": runtime.world_size,
        "lr": config.lr, "max_length": config.max_length, "bf16": bf16,
        "validation_before": state["before"], "validation_after": after, "best_step": state["best_step"],
        "test": test, "wall_time_s": time.perf_counter() - started, "train_time_s": train_time,
        "memory": {**peak_memory_bytes(runtime.device), "train_steps_peak_rss_bytes": train_steps_peak},
        "device": str(runtime.device),
        "saved_to": str(saved_to), "saved_bytes": folder_size(saved_to) if saved_to.exists() else 0,
        "metrics_path": str(out / "metrics.jsonl"), "plot_path": str(out / "curves.png"),
        "report_path": str(out / "report.json"), "settings": config.settings(),
    }
    if runtime.is_main:
        if test is not None:
            log.write(step=step, split="test", **test)
        from lorakit.plots import plot_training_curves

        plot_training_curves(read_metrics(out / "metrics.jsonl"), out / "curves.png", metric=task.metric)
        checkpoint.write_json_atomically(report, out / "report.json")
        say(format_report(report))
    return report


# ---------------------------------------------------------------- pieces of the loop


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: linear 0 -> 1 over ``warmup_steps``, then a
    cosine from 1 down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _frozen_to_bf16(model) -> None:
    """Store the parameters that do not train in bfloat16: under bf16 autocast every
    product reads them in bf16 anyway, and weights that never change need no fp32 master
    copy. Halves the frozen model's memory, and no per-step bf16 casts of them are kept
    for the backward pass. Trainable parameters (adapter, head) stay fp32."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters: matrices with weight decay, biases and norm scales without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_trained(method, model, tokenizer, out: Path, config: TrainConfig, data, best_file: Path) -> None:
    """Keep the best weights: the trainable tensors (to restore them at the end) and
    the exported adapter or model folder, with the task file that ``lorakit eval``,
    ``predict`` and ``generate`` read."""
    checkpoint.save_tensors_atomically(
        {name: p for name, p in model.named_parameters() if p.requires_grad}, best_file)
    def absolute(spec: str) -> str:
        return str(Path(spec).resolve()) if spec != "default" and Path(spec).exists() else spec

    task_info = {"task": config.task, "method": config.method, "model": absolute(config.model),
                 "adapter_name": config.adapter_name, "labels": data.labels, "max_length": config.max_length,
                 "data": absolute(config.data), "data_limit": config.data_limit}

    def write(folder: Path):
        method.export(model, tokenizer, folder, config)
        (folder / TASK_FILE).write_text(json.dumps(task_info, indent=2) + "\n")

    checkpoint.replace_folder(out / method.saved_name, write)


def _restore(model, best_file: Path) -> None:
    if not best_file.is_file():
        return
    best = load_file(str(best_file))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in best:
                p.copy_(best[name])


def _adapted_modules(model) -> list[str]:
    """Names of the module kinds carrying LoRA factors (``["query", "value"]``), if any."""
    from lorakit.model import lora_layers

    return sorted({path.rsplit(".", 1)[-1] for path, _ in lora_layers(model)})


def _check_same_settings(saved: dict, now: dict, where: Path) -> None:
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise LorakitError(f"the checkpoint in {where} was made with other settings ({listed}); resume with the "
                           "same flags, or drop --resume to start afresh")


def _show(task, metrics: dict) -> str:
    parts = [f"{task.metric} {metrics[task.metric]:.4f}"]
    if task.metric != "loss":
        parts.append(f"loss {metrics['loss']:.4f}")
    return ", ".join(parts)


def _progress(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="training")
