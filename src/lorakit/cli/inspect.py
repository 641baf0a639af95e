"""`lorakit inspect MODEL`: the modules LoRA can target, and what an adapter on them costs;
`lorakit inspect ADAPTER`: what an adapter folder holds.

Parsing and printing only: the model comes from :func:`lorakit.models.load_model`, the
numbers from :func:`lorakit.models.target_footprint`; an adapter's from
:func:`lorakit.analysis.summary.adapter_summary`.
"""

from __future__ import annotations

from collections import OrderedDict

from lorakit.errors import LorakitError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list the modules LoRA can target, with shapes and the adapter's parameter count",
        description=(
            "Load MODEL (default: the embedded MiniLM classifier; default-chat: the embedded "
            "SmolLM2-135M-Instruct; or a model folder / .gguf file) and print the modules an "
            "adapter can target, grouped by name, with the parameters an adapter of rank R "
            "adds on the ones --targets selects (the model family's default when not given). Given an "
            "adapter folder (or a lorakit train run folder), print what the adapter holds instead: its "
            "base, rank, scale, modules, parameters, task, and each module's ‖ΔW‖."
        ),
    )
    parser.add_argument("model", nargs="?", default="default", help="default | default-chat | PATH | ADAPTER")
    parser.add_argument("--rank", "-r", type=int, default=8, metavar="R", help="adapter rank (default 8)")
    parser.add_argument("--targets", metavar="NAMES",
                        help="comma-separated module names (query,value), all-linear, or a regex matching a "
                             "module's name or path (query|value)")
    parser.add_argument("--target-parameters", metavar="NAMES",
                        help="comma-separated parameters adapted directly (PEFT's target_parameters), e.g. "
                             "experts.gate_up_proj,experts.down_proj: a mixture-of-experts model's fused experts")
    parser.add_argument("--layers-to-transform", metavar="BLOCKS",
                        help="only the targets in these blocks, e.g. 10,11 or 8-11 (as lorakit train)")
    parser.add_argument("--paths", action="store_true", help="list every module path instead of grouping by name")
    _add_memory_flags(parser)
    parser.set_defaults(func=run_inspect)


def _add_memory_flags(parser) -> None:
    """``--memory`` and the ``lorakit train`` flags it reads (defaults from TrainConfig)."""
    import argparse
    from dataclasses import fields

    from lorakit.methods import METHODS
    from lorakit.tasks import TASKS
    from lorakit.train_config import TrainConfig

    default = {f.name: f.default for f in fields(TrainConfig)}
    group = parser.add_argument_group("--memory", "predict the peak memory of a training step (as lorakit train "
                                                  "would run it) from the model's config, before loading anything")
    group.add_argument("--memory", action="store_true", help="predict the training peak instead of listing modules")
    group.add_argument("--task", choices=sorted(TASKS), default=None,
                       help="the task (default: chat for a causal LM, classify otherwise)")
    group.add_argument("--method", choices=sorted(METHODS), default=default["method"],
                       help="what trains (default: lora)")
    group.add_argument("--quantize", choices=["nf4", "int8"], default=None, help="a quantized frozen base (QLoRA)")
    group.add_argument("--batch-size", type=int, default=default["batch_size"],
                       help=f"examples per forward pass (default: {default['batch_size']})")
    group.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the task's)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision as lorakit train runs it (default: where the CPU computes bf16)")
    group.add_argument("--budget", type=float, metavar="GIB", default=None,
                       help="memory to fit in, GiB (default: this machine's)")


def run_inspect(args) -> int:
    if args.memory:
        return run_memory(args)
    if _is_adapter(args.model):
        return run_adapter(args)
    from lorakit.config import parse_layers, parse_parameters, parse_targets
    from lorakit.models import load_model, target_footprint

    layers, parameters = parse_layers(args.layers_to_transform), parse_parameters(args.target_parameters)
    model, _ = load_model(args.model, tokenizer=False)
    report = target_footprint(model, rank=args.rank, targets=parse_targets(args.targets), layers=layers,
                              parameters=parameters)
    rows = report["modules"]
    if args.paths:
        table = [(path, kind, "x".join(map(str, shape)), "yes" if sel else "", f"{params:,}")
                 for path, kind, shape, sel, params in rows]
        header = ("module", "type", "weight", "target", f"params@r={args.rank}")
    else:
        groups: OrderedDict = OrderedDict()
        for path, kind, shape, sel, params in rows:
            key = (_short(path, kind), kind, shape, sel)
            count, total = groups.get(key, (0, 0))
            groups[key] = (count + 1, total + params)
        table = [(name, kind, "x".join(map(str, shape)), str(count), "yes" if sel else "", f"{total:,}")
                 for (name, kind, shape, sel), (count, total) in groups.items()]
        header = ("name", "type", "weight", "count", "target", f"params@r={args.rank}")
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    adapter, total = report["adapter_params"], report["model_params"]
    chosen = sorted({_short(path, kind) for path, kind, _, sel, _ in rows if sel})
    stacks = sum(kind == "parameter" for _, kind, _, _, _ in rows)
    more = f" and {stacks} parameters (--target-parameters)" if stacks else ""
    print(f"\n{type(model).__name__}: {len(rows) - stacks} targetable modules{more}, {total:,} parameters")
    print(f"adapter at rank {args.rank} on {','.join(chosen)} ({sum(r[3] for r in rows)} modules): "
          f"{adapter:,} parameters ({100.0 * adapter / total:.4f}% of the model)")
    return 0


def _short(path: str, kind: str) -> str:
    """A row's name: a module's own (``q_proj``), a parameter's with its module's (``gate.weight``)."""
    return ".".join(path.split(".")[-2 if kind == "parameter" else -1:])


def run_memory(args) -> int:
    import torch

    from lorakit.config import parse_layers, parse_parameters, parse_targets
    from lorakit.distributed import run_in_bf16
    from lorakit.memory import GiB, available_bytes, predict_peak
    from lorakit.models import is_causal_lm, load_model_config
    from lorakit.recipe import with_shape
    from lorakit.train_config import TrainConfig

    task = args.task or ("chat" if args.model == "default-chat" or (
        args.model != "default" and is_causal_lm(load_model_config(args.model))) else "classify")
    config = TrainConfig(task=task, model=args.model, method=args.method, rank=args.rank, targets=parse_targets(args.targets),
                         layers_to_transform=parse_layers(args.layers_to_transform), quantize=args.quantize,
                         target_parameters=parse_parameters(args.target_parameters),
                         batch_size=args.batch_size, max_length=args.max_length,
                         gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16)
    config = with_shape(config)
    _check_length(config)
    estimate = predict_peak(config)
    if args.budget is not None and not (0 < args.budget < float("inf")):
        raise LorakitError(f"--budget {args.budget} is not a memory size; give GiB as a positive number, e.g. 8")
    budget = int(args.budget * GiB) if args.budget else available_bytes()
    bf16 = run_in_bf16(config.bf16, torch.device("cpu"))
    levers = [config.method + (f" r={config.rank}" if config.method != "full" else ""),
              f"{config.batch_size}x{config.max_length} tokens", "bf16" if bf16 else "fp32",
              *([config.quantize] if config.quantize else []),
              *(["gradient checkpointing"] if config.gradient_checkpointing else [])]
    print(f"training peak of {args.model} ({task}; {', '.join(levers)}), predicted on fake tensors:")
    for name, size in estimate.rows():
        print(f"  {name:<16} {size / GiB:8.2f} GiB")
    verdict = "fits in" if estimate.fits(budget) else "does NOT fit in"
    print(f"{verdict} {budget / GiB:.1f} GiB{'' if args.budget else ' (this machine)'}; "
          f"{estimate.trainable:,} trainable parameters")
    return 0


def _check_length(config) -> None:
    """Refuse a --max-length past the positions the model can look up (the prediction would
    build a model that cannot run it, and take minutes doing so), as lorakit train does."""
    from lorakit.models import load_model_config

    source = config.model if config.model not in ("default", "default-chat") else None
    limit = getattr(load_model_config(source), "max_position_embeddings", None) if source else None
    if limit and config.max_length > limit:
        raise LorakitError(f"--max-length {config.max_length} is longer than {config.model} takes "
                           f"({limit} positions); give at most {limit}")


def _is_adapter(spec: str) -> bool:
    from pathlib import Path

    from lorakit.io import CONFIG_NAME
    from lorakit.run_folder import adapter_folder

    if spec in ("default", "default-chat") or not Path(spec).expanduser().is_dir():
        return False
    return (adapter_folder(Path(spec).expanduser()) / CONFIG_NAME).is_file()


def run_adapter(args) -> int:
    from lorakit.analysis.summary import adapter_summary

    summary = adapter_summary(args.model)
    config, modules, task = summary.config, summary.modules, summary.task or {}
    architecture = summary.metadata.get("lorakit_architecture")
    print(f"adapter     {summary.folder} ({summary.bytes / 1e3:,.1f} kB)")
    print(f"base        {config.base_model_name_or_path or 'not recorded'}"
          + (f" ({architecture})" if architecture else ""))
    ranks = "/".join(map(str, sorted({m.rank for m in modules})))
    scales = "/".join(sorted({f"{m.scaling:g}" for m in modules}))
    kind = "DoRA" if config.use_dora else "LoRA"
    print(f"method      {kind} r={config.r} alpha={config.alpha:g}" + (" rsLoRA" if config.use_rslora else "")
          + f", rank {ranks} as saved, scale s = {scales}"
          + (f", task_type {config.task_type}" if config.task_type else ""))
    if task:
        labels = task.get("labels")
        shown = (", labels " + ", ".join(map(str, labels[:8])) + (f" (+{len(labels) - 8})" if len(labels) > 8 else "")
                 if isinstance(labels, list) and labels else "")
        print(f"task        {task.get('task', '?')} ({task.get('method', '?')}){shown}"
              + (f"; inputs cut to {task['max_length']} tokens" if task.get("max_length") else ""))
    saved = ", ".join(config.modules_to_save or []) or "none"
    print(f"parameters  {summary.lora_params:,} in the factors of {len(modules)} modules; "
          f"{summary.other_params:,} more (saved whole: {saved})")
    if args.paths:
        table = [(m.path, str(m.rank), _shape(m), f"{m.scaling:g}", f"{m.delta_norm:.4g}") for m in modules]
        header = ("module", "rank", "ΔW", "s", "‖s·B·A‖_F")
    else:
        groups: OrderedDict = OrderedDict()
        for m in modules:
            groups.setdefault((m.path.rsplit(".", 1)[-1], m.rank, _shape(m)), []).append(m.delta_norm)
        table = [(name, str(len(norms)), str(rank), shape,
                  f"{min(norms):.4g} / {sorted(norms)[len(norms) // 2]:.4g} / {max(norms):.4g}")
                 for (name, rank, shape), norms in groups.items()]
        header = ("name", "count", "rank", "ΔW", "‖s·B·A‖_F min / median / max")
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _shape(module) -> str:
    """A module's ΔW as ``outxin``; a stack of experts' as ``E × outxin``."""
    shape = "x".join(map(str, module.shape))
    return f"{module.experts} × {shape}" if module.experts > 1 else shape
