"""Every setting of a training run, in one dataclass: :class:`TrainConfig`.

Each field carries its help text beside it (``field(metadata=setting(...))``); the
``lorakit train`` flags are generated from these fields (``--batch-size`` for
``batch_size``), so a default is written once, here. A None default of the batch, the
learning rate, the max length and the run's length means "the recipe chooses" from the
data (:mod:`lorakit.recipe`, called when training sets up); what the recipe starts from
per task or method (epochs, step floor, length cap, learning rate at batch 32) is
written once in :mod:`lorakit.tasks` and :mod:`lorakit.methods`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from lorakit.chat_templates import check as check_template
from lorakit.config import (
    BIAS_MODES, narrows_a_regex, parse_layers, parse_modules, parse_parameters, parse_targets,
)
from lorakit.data.files import FORMATS
from lorakit.errors import LorakitError
from lorakit.layers.quantized import QUANT_KINDS
from lorakit.methods import METHODS, get_method
from lorakit.tasks import TASKS, get_task, per_task
from lorakit.recipe import MAX_EPOCHS
from lorakit.tasks.classify import CLASS_WEIGHTS

TRAINABLE_INITS = ("gaussian", "kaiming", "olora", "pissa")  # olora, pissa: saved converted for the original W
EVALUATIONS_PER_RUN = 5  # when eval_every is not given
DEFAULT_OUT = "runs/{task}-{method}"


def setting(help: str, *, choices: Callable[[], list] | None = None, default_help: str | Callable[[], str] | None = None,
            group: str | None = None, flag: bool = True, shared: bool = True) -> dict:
    """A field's metadata: what the flag generator and :meth:`TrainConfig.settings` read.

    Args:
        help: what the setting does (the flag's help, without its default).
        choices: ``() -> allowed values``, read when the parser is built (registries).
        default_help: what a None default means (text, or ``() -> text`` from a registry).
        group: flags in the same group exclude each other (``--steps`` / ``--epochs``).
        flag: False for a setting that is no ``lorakit train`` flag.
        shared: whether a ``--resume`` must share it with the run it continues.
    """
    return {"help": help, "choices": choices, "default_help": default_help, "group": group, "flag": flag,
            "shared": shared}


def _per_task(attribute: str, lead: str = "the task's") -> Callable[[], str]:
    """``"the task's: classify 64, chat 256, text 128"`` from the registered tasks."""
    return lambda: f"{lead}: {per_task(attribute)}"


def _lr_per_method() -> str:
    short = ", ".join(f"{name} {m.short_run_lr:g}" for name, m in sorted(METHODS.items()) if m.short_run_lr)
    return ("the method's: " + ", ".join(f"{name} {method.default_lr:g}" for name, method in sorted(METHODS.items()))
            + (f" ({short} when the recipe shortens the run for fp32)" if short else ""))


@dataclass
class TrainConfig:
    """Every setting of a training run (the ``lorakit train`` flags, same names); the
    help text of each field says what it does."""

    task: str = field(default="classify", metadata=setting(
        "what to learn: classify (text -> label), regress (text -> a number), chat (assistant turns) or "
        "text (language modelling)",
        choices=lambda: sorted(TASKS)))
    model: str = field(default="default", metadata=setting("'default' (the task's embedded model) or a model folder"))
    data: str = field(default="default", metadata=setting(
        f"'default' (embedded dataset), a {FORMATS} file, a folder saved by Hugging Face datasets "
        "(save_to_disk), or a folder with train/validation(/test) files"))
    text_column: str | None = field(default=None, metadata=setting(
        "the column holding the text, when it is not 'text'", default_help="text"))
    label_column: str | None = field(default=None, metadata=setting(
        "the column holding the class, when it is not 'label'", default_help="label"))
    prompt_column: str | None = field(default=None, metadata=setting(
        "the column holding a prompt, when it is not 'prompt'", default_help="prompt"))
    completion_column: str | None = field(default=None, metadata=setting(
        "the column holding a completion, when it is not 'completion'", default_help="completion"))
    messages_column: str | None = field(default=None, metadata=setting(
        "the column holding a chat's messages, when it is not 'messages'", default_help="messages"))
    chat_template: str | None = field(default=None, metadata=setting(
        "the chat template for a model whose tokenizer has none, or to replace its own: chatml (turns as "
        "<|im_start|>role ... <|im_end|>), or a Jinja template file; saved beside the adapter as chat_template.jinja",
        default_help="the tokenizer's own"))
    stream: bool | None = field(default=None, metadata=setting(
        "read a .jsonl/.parquet file as a stream of blocks instead of whole (for files larger than memory)",
        default_help="for files over 1 GiB"))
    stream_buffer: int = field(default=10_000, metadata=setting(
        "records a streamed file's reader holds at most (its blocks, shuffled one at a time)"))
    method: str = field(default="lora", metadata=setting(
        "what trains: lora, full (every weight), or adalora (ranks pruned during training)",
        choices=lambda: sorted(METHODS)))
    rank: int = field(default=8, metadata=setting("LoRA rank r"))
    alpha: float = field(default=16, metadata=setting("LoRA alpha; the update is scaled by alpha/r"))
    init_rank: int | None = field(default=None, metadata=setting(
        "adalora: rank of every adapted matrix at the start", default_help="--rank"))
    target_rank: int | None = field(default=None, metadata=setting(
        "adalora: average rank per matrix at the end; the total budget, this times the number of adapted "
        "matrices, is shared out by importance", default_help="init rank // 3, at least 1"))
    targets: list[str] | str | None = field(default=None, metadata=setting(
        "modules to adapt: names (query,value), a regex, or all-linear",
        default_help="the model family's, e.g. query,value for BERT, q_proj,v_proj for Llama; for a "
                     "family without one, the first such pair the model has"))
    target_parameters: list[str] | str | None = field(default=None, metadata=setting(
        "parameters to adapt directly, comma-separated (PEFT's target_parameters): a mixture-of-experts model's "
        "fused experts, e.g. experts.gate_up_proj,experts.down_proj (lorakit inspect lists them), one rank-r "
        "adapter per expert; without --targets only these, as in PEFT (--method lora)", default_help="none"))
    layers_to_transform: list[int] | str | None = field(default=None, metadata=setting(
        "adapt the targets in these blocks only: 10,11 or 8-11 (PEFT's layers_to_transform; --method lora)",
        default_help="every block"))
    trainable_tokens: list[str | int] | str | None = field(default=None, metadata=setting(
        "train these tokens' embedding rows whole, beside the adapter (PEFT's trainable_token_indices; an output "
        "head tied to the embedding follows): tokens or ids, comma-separated, e.g. '<|im_start|>,<|im_end|>' "
        "(--method lora)", default_help="none"))
    modules_to_save: list[str] | str | None = field(default=None, metadata=setting(
        "modules trained whole and saved in the adapter beside it (PEFT's modules_to_save), comma-separated names "
        "or ends of paths, e.g. lm_head or embed_tokens (--method lora)",
        default_help="the task's head only (a classifier's)"))
    lora_dropout: float = field(default=0.0, metadata=setting("dropout on the LoRA branch's input"))
    dora: bool = field(default=False, metadata=setting(
        "DoRA: also train a magnitude per output feature, W' = m * (W + s*B*A) / ||W + s*B*A|| (method lora)"))
    rslora: bool = field(default=False, metadata=setting(
        "rank-stabilized LoRA (PEFT's use_rslora): the update is scaled by alpha/sqrt(rank) instead of alpha/rank "
        "(--method lora)"))
    lora_bias: bool = field(default=False, metadata=setting(
        "give B a bias b too (PEFT's lora_bias): the update adds s*b, merged into the layer's bias; starts with "
        "--init kaiming (method lora)"))
    bias: str = field(default="none", metadata=setting(
        "which biases train beside the adapter, saved in it as PEFT's bias key: none, all (every bias of the model) "
        "or lora_only (the adapted layers'); --method lora", choices=lambda: list(BIAS_MODES)))
    init: str = field(default="gaussian", metadata=setting(
        "how LoRA's A and B start: gaussian (the seeds' A ~ N(0, 1/r^2), B = 0), kaiming (PEFT's default), "
        "pissa or olora (from W's top singular / QR directions; saved as a rank-2r adapter for the original base)",
        choices=lambda: list(TRAINABLE_INITS)))
    model_dropout: float | None = field(default=None, metadata=setting(
        "set every dropout of the model to this probability", default_help="the model's own, 0.1 for BERT"))
    steps: int | None = field(default=None, metadata=setting(
        "optimizer steps", default_help=lambda: _per_task("default_epochs", "the recipe's: the task's epochs")() +
        f" (in fp32: {per_task('epochs', False)}); at least the task's floor of steps ({per_task('min_steps')}) and of examples seen "
        f"({per_task('min_examples')}), at most "
        f"{MAX_EPOCHS} epochs", group="length"))
    epochs: float | None = field(default=None, metadata=setting(
        "passes over the training split", default_help=lambda: _per_task("default_epochs", "the recipe's: the task's")()
        + f" (in fp32: {per_task('epochs', False)})", group="length"))
    batch_size: int | None = field(default=None, metadata=setting(
        "examples per process per forward pass; an optimizer step's global batch is "
        "batch_size x grad_accum x processes",
        default_help="the recipe's: a global batch of 32, 16 or 8, the largest that gives the task's step floor"))
    grad_accum: int | None = field(default=None, metadata=setting(
        "forward passes per optimizer step (micro-batches)",
        default_help="the recipe's: 1, or as many as keep one pass's predicted activations under 1 GiB when "
                     "--batch-size is not given; 1 when it is"))
    group_by_length: bool = field(default=True, metadata=setting(
        "batch examples of similar length together (less padding)", flag=False))
    lr: float | None = field(default=None, metadata=setting(
        "peak learning rate, reached after the warmup, then a cosine decay to 0",
        default_help=lambda: "the recipe's: the method's, " + _lr_per_method()[len("the method's: "):]))
    warmup: float = field(default=0.06, metadata=setting("fraction of the steps spent warming the learning rate up"))
    weight_decay: float = field(default=0.01, metadata=setting(
        "AdamW's decoupled weight decay on matrices (not on biases and norms)"))
    loraplus_ratio: float | None = field(default=None, metadata=setting(
        "LoRA+: B's learning rate is this times A's (--lr), e.g. 16", default_help="off, one learning rate"))
    max_grad_norm: float = field(default=1.0, metadata=setting(
        "gradients are clipped to this global L2 norm", flag=False))
    label_smoothing: float = field(default=0.0, metadata=setting("label smoothing of the classification loss"))
    class_weights: str | None = field(default=None, metadata=setting(
        "weigh the classification loss by class: balanced gives class c the weight n/(k*n_c), so rare classes "
        "count as much as common ones", choices=lambda: list(CLASS_WEIGHTS), default_help="every example alike"))
    max_length: int | None = field(default=None, metadata=setting(
        "tokens per example; longer ones are truncated",
        default_help=lambda: "the recipe's: the 99th percentile of the training texts' token lengths, rounded up to "
                             f"a multiple of 16, at most the model's limit and the task's cap ({per_task('max_length_cap')})"))
    # bf16 on: forward and backward products in bfloat16 under torch.autocast; weights,
    # gradients and AdamW state stay fp32 (a method that freezes the model, lora, then
    # stores the frozen weights in bf16). Slower on CPUs without bfloat16 hardware.
    bf16: bool | None = field(default=None, metadata=setting(
        "mixed precision: matrix products in bfloat16, weights and optimizer in fp32; about 2x faster on GPUs "
        "and on CPUs with AMX",
        default_help="on where the hardware computes bfloat16, else off"))
    compile: bool = field(default=False, metadata=setting(
        "compile the model with torch.compile (needs a C++ compiler on CPU, Triton on GPU); the first steps and "
        "evaluations take longer while it compiles", shared=False))
    eval_every: int | None = field(default=None, metadata=setting(
        "steps between evaluations and checkpoints", default_help=f"{EVALUATIONS_PER_RUN} per run"))
    eval_batch_size: int | None = field(default=None, metadata=setting(
        "examples per evaluation forward pass", default_help=_per_task("default_eval_batch_size"), flag=False,
        shared=False))
    out: str | None = field(default=None, metadata=setting(
        "output folder: a new or empty one, or an earlier run's", default_help=DEFAULT_OUT.format(task="<task>", method="<method>"),
        shared=False))
    resume: bool = field(default=False, metadata=setting("continue from the checkpoint in --out", shared=False))
    overwrite: bool = field(default=False, metadata=setting(
        "write into an --out folder that lorakit did not write (files of other names are kept)", shared=False))
    seed: int = field(default=0, metadata=setting("seeds the data order, the adapter's init and dropout"))
    data_limit: int | None = field(default=None, metadata=setting(
        "use only this many training examples (quick trials)"))
    stop_after: int | None = field(default=None, metadata=setting(
        "stop (as if interrupted, checkpoint written) after this many steps", flag=False, shared=False))
    device: str = field(default="auto", metadata=setting("auto (GPU if any), cpu or cuda", shared=False))
    quantize: str | None = field(default=None, metadata=setting(
        "store the frozen linear weights as nf4 (4-bit NormalFloat, double quantization) or int8 (QLoRA); "
        "--method lora only", choices=lambda: list(QUANT_KINDS), default_help="not quantized"))
    gradient_checkpointing: bool = field(default=False, metadata=setting(
        "keep only each block's input for the backward and recompute the block there: less memory, "
        "one more forward of compute"))
    fsdp: bool = field(default=False, metadata=setting(
        "under torchrun, shard the weights, gradients and optimizer state over the processes (FSDP2, one unit "
        "per transformer block) instead of a whole model in each (DDP): for models one process cannot hold",
        shared=False))
    adapter_name: str = field(default="default", metadata=setting("the adapter's name in the model", flag=False))
    progress: bool = field(default=True, metadata=setting("show the progress bar", flag=False, shared=False))

    def __post_init__(self):
        task = get_task(self.task)
        method = get_method(self.method)
        if self.steps is not None and self.epochs is not None:
            raise LorakitError(f"give --steps ({self.steps}) or --epochs ({self.epochs}), not both")
        for name in ("rank", "init_rank", "target_rank", "batch_size", "grad_accum", "steps", "max_length", "eval_every", "eval_batch_size",
                     "data_limit", "stop_after", "stream_buffer"):
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
        if self.loraplus_ratio is not None and (self.method != "lora" or not self.loraplus_ratio > 0):
            raise LorakitError(f"--loraplus-ratio must be a positive number with --method lora, got "
                               f"{self.loraplus_ratio!r} with --method {self.method}")
        if self.fsdp and not method.shardable:
            raise LorakitError(f"--method {self.method} cannot train with --fsdp (its rank budget reads whole "
                               "tensors after each step); drop --fsdp to run it with a whole model in each process")
        if self.quantize is not None and self.quantize not in QUANT_KINDS:
            raise LorakitError(f"quantize {self.quantize!r} is unknown; choose one of {list(QUANT_KINDS)}")
        if self.quantize is not None and (self.method != "lora" or self.fsdp):
            raise LorakitError(f"--quantize {self.quantize} is for --method lora in one process or under DDP "
                               f"(it freezes the base weights in a packed form), not --method {self.method}"
                               f"{' with --fsdp' if self.fsdp else ''}")
        for flag in ("dora", "lora_bias", "rslora"):
            if getattr(self, flag) and self.method != "lora":
                raise LorakitError(f"--{flag.replace('_', '-')} is for --method lora, not {self.method!r}")
        if self.bias not in BIAS_MODES:
            raise LorakitError(f"bias {self.bias!r} is unknown; choose one of {list(BIAS_MODES)}")
        if self.bias != "none" and self.method != "lora":
            raise LorakitError(f"--bias {self.bias} is for --method lora, not {self.method!r}")
        if self.lora_bias and (self.dora or self.init != "kaiming"):
            raise LorakitError("--lora-bias starts from --init kaiming (PEFT loads a bias on B with that start only) "
                               f"and without --dora; got --init {self.init}{' with --dora' if self.dora else ''}")
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
        if self.class_weights is not None and not task.has_classes:
            raise LorakitError(f"--class-weights is for a task with classes; task {self.task!r} has none")
        if self.label_smoothing and not task.smooths_labels:
            raise LorakitError(f"--label-smoothing is for a loss over classes or tokens; task {self.task!r} fits "
                               "numbers (leave it out)")
        if self.chat_template is not None:
            if task.trains_head:
                raise LorakitError(f"--chat-template is for a task that generates (chat, text); task {self.task!r} "
                                   "does not")
            check_template(self.chat_template)  # a file: read now, so a bad path fails at once
        if self.class_weights is not None and self.class_weights not in CLASS_WEIGHTS:
            raise LorakitError(f"class_weights {self.class_weights!r} is unknown; choose one of {list(CLASS_WEIGHTS)}")
        self.targets = parse_targets(self.targets)
        self.layers_to_transform = parse_layers(self.layers_to_transform)
        self.target_parameters = parse_parameters(self.target_parameters)
        if self.layers_to_transform is not None and self.method != "lora":
            raise LorakitError(f"--layers-to-transform is for --method lora, not {self.method!r}")
        if narrows_a_regex(self.targets, self.layers_to_transform):
            raise LorakitError(f"--layers-to-transform cannot narrow a regex --targets ({self.targets!r}, as in "
                               "PEFT): name the blocks in the regex, or give --targets as names such as query,value")
        self.modules_to_save = parse_modules(self.modules_to_save)
        self.trainable_tokens = _token_list(self.trainable_tokens)
        for name in ("target_parameters", "modules_to_save", "trainable_tokens"):
            if getattr(self, name) and (self.method != "lora" or self.fsdp):
                raise LorakitError(f"--{name.replace('_', '-')} is for --method lora without --fsdp, not --method "
                                   f"{self.method}{' with --fsdp' if self.fsdp else ''}")
        self.eval_batch_size = self.eval_batch_size or task.default_eval_batch_size
        self.out = self.out or DEFAULT_OUT.format(task=self.task, method=self.method)

    def columns(self) -> dict:
        """``{standard key: the user's column}`` of the ``--*-column`` flags given."""
        return {key: getattr(self, f"{key}_column") for key in ("text", "label", "prompt", "completion", "messages")
                if getattr(self, f"{key}_column")}

    def settings(self) -> dict:
        """The settings a resume must share with the run it continues (fields marked ``shared``)."""
        shared = {f.name for f in fields(self) if f.metadata["shared"]}
        return {k: v for k, v in asdict(self).items() if k in shared}


def _token_list(value) -> list[str | int] | None:
    """``--trainable-tokens``: comma-separated tokens or ids as a list (ids as ints), or None."""
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if not value:
        return None
    return [int(t) if isinstance(t, str) and t.isdigit() else t for t in value]
