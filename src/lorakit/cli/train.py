"""`lorakit train`: fine-tune a model (LoRA or full) on a task; the work is lorakit.train.train."""

from __future__ import annotations

import argparse

from lorakit.methods import METHODS
from lorakit.tasks import TASKS
from lorakit.train import TRAINABLE_INITS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model with LoRA (or fully) on a task",
        description="Fine-tune a pretrained model on a task. With no arguments: LoRA r=8 on the embedded "
                    "all-MiniLM-L6-v2 classifying the embedded Rotten Tomatoes reviews (a few minutes on a "
                    "laptop CPU). Runs under torchrun too: torchrun --nproc_per_node=N -m lorakit train ...",
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="classify",
                        help="classify (text -> label; the default), chat (assistant turns) or text (language modelling)")
    parser.add_argument("--model", default="default", help="'default' (the task's embedded model) or a model folder")
    parser.add_argument("--data", default="default",
                        help="'default' (embedded dataset), a .jsonl/.csv file, or a folder with train/validation files")
    parser.add_argument("--method", choices=sorted(METHODS), default="lora",
                        help="what trains: lora (the default), full, or adalora (ranks pruned during training)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha/r (default: 16)")
    parser.add_argument("--init-rank", type=int, default=None,
                        help="adalora: rank of every adapted matrix at the start (default: --rank)")
    parser.add_argument("--target-rank", type=int, default=None,
                        help="adalora: average rank per matrix at the end; the total budget is this times the "
                             "number of adapted matrices (default: init rank // 3)")
    parser.add_argument("--targets", default=None,
                        help="modules to adapt: names (query,value), a regex, or all-linear "
                             "(default: the model family's, e.g. query,value for BERT)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 3 epochs for classify, "
                                                                 "else one)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per process per forward pass (default: 32)")
    parser.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step (default: 1)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 lora, 1e-4 full)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example; longer ones are truncated (default: 64 classify, 256 chat, 128 text)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision: matrix products in bfloat16, weights and optimizer in fp32; about 2x "
                             "faster on GPUs and on CPUs with AMX (default: on where the hardware computes bfloat16, "
                             "else off; --no-bf16 for fp32)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between evaluations and checkpoints (default: 5 per run)")
    parser.add_argument("--init", choices=TRAINABLE_INITS, default="gaussian",
                        help="how LoRA's A and B start (default: gaussian, A ~ N(0, 1/r^2), B = 0)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch's input (default: 0)")
    parser.add_argument("--warmup", type=float, default=0.06,
                        help="fraction of the steps spent warming the learning rate up (default: 0.06)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices (default: 0.01)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<task>-<method>)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0, help="seeds data order, adapter init and dropout (default: 0)")
    parser.add_argument("--model-dropout", type=float, default=None,
                        help="set every dropout of the model to this probability (default: the model's own)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="classification label smoothing (default: 0)")
    parser.add_argument("--data-limit", type=int, default=None,
                        help="use only this many training examples (quick trials)")
    parser.add_argument("--device", default="auto", help="auto (GPU if any, the default), cpu or cuda")
    parser.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                        help="store the frozen linear weights in nf4 (QLoRA) or int8; the adapter trains in full "
                             "precision (default: not quantized)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward: less memory, more time")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.train import TrainConfig, TrainingInterrupted, train

    config = TrainConfig(
        task=args.task, model=args.model, data=args.data, method=args.method, rank=args.rank, alpha=args.alpha,
        init_rank=args.init_rank, target_rank=args.target_rank, targets=args.targets, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, max_length=args.max_length, eval_every=args.eval_every,
        out=args.out, resume=args.resume, seed=args.seed, label_smoothing=args.label_smoothing, device=args.device,
        data_limit=args.data_limit, model_dropout=args.model_dropout, init=args.init, lora_dropout=args.lora_dropout,
        warmup=args.warmup, weight_decay=args.weight_decay, bf16=args.bf16,
        quantize=args.quantize, gradient_checkpointing=args.gradient_checkpointing,
    )
    try:
        train(config)
    except TrainingInterrupted as stop:
        print(f"lorakit train: {stop}", flush=True)
        return 130
    return 0

