"""`lorakit train`: fine-tune a model (LoRA or full) on a task; the work is lorakit.train.train.

The flags are made from :class:`lorakit.train_config.TrainConfig`'s fields (``--batch-size``
for ``batch_size``), their help from each field's metadata; a flag not given is left out,
so the dataclass's default applies: every default is written once, there.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields

from lorakit.train_config import TrainConfig

FLAG_TYPES = (bool, int, float, str)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model with LoRA (or fully) on a task",
        description="Fine-tune a pretrained model on a task. With no arguments: LoRA r=8 on the embedded "
                    "all-MiniLM-L6-v2 classifying the embedded Rotten Tomatoes reviews (a few minutes on a "
                    "laptop CPU). Runs under torchrun too: torchrun --nproc_per_node=N -m lorakit train ...",
    )
    add_config_flags(parser, TrainConfig)
    parser.set_defaults(func=run)


def add_config_flags(parser: argparse.ArgumentParser, config_class, only=None) -> None:
    """One flag per field of the dataclass ``config_class`` whose metadata (see
    :func:`lorakit.train_config.setting`) says it is one (of the fields named in ``only``,
    when given: a verb that runs training, such as ``lorakit sweep``, offers some of them).

    The flag's type comes from the field's annotation (``int | None`` -> int); a bool
    defaulting to False is a switch, a ``bool | None`` a ``--x/--no-x`` pair. Flags of one
    ``group`` exclude each other. Every flag defaults to "not given"
    (``argparse.SUPPRESS``), so the dataclass's own default applies.
    """
    hints = typing.get_type_hints(config_class)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(config_class):
        meta = f.metadata
        if not meta.get("flag") or (only is not None and f.name not in only):
            continue
        kind, optional = _flag_type(hints[f.name])
        kwargs: dict = {"default": argparse.SUPPRESS, "help": _help(f, meta)}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if optional else "store_true"
        else:
            kwargs["type"] = kind
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]()
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def config_from_args(args: argparse.Namespace, config_class=TrainConfig):
    """The dataclass made from the flags given (the others keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}
    return config_class(**given)


def _flag_type(annotation) -> tuple[type, bool]:
    """``(the type a flag parses, whether None is allowed)`` of a field's annotation."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    kind = next((a for a in args if a in FLAG_TYPES), None)
    if kind is None:
        raise TypeError(f"no flag type for the annotation {annotation!r}")
    return kind, type(None) in args


def _help(f, meta) -> str:
    """The field's help with its default: the value, or what a None default means."""
    text = meta["help"]
    default = None if f.default is MISSING else f.default
    if default is None:
        said = meta.get("default_help")
        said = said() if callable(said) else said
    elif isinstance(default, bool):
        said = None  # a switch: off unless given
    elif isinstance(default, (int, float)) or meta.get("choices"):
        said = f"{default:g}" if isinstance(default, float) else str(default)
    else:
        said = None  # a string that the help explains ('default', 'auto')
    text = f"{text} (default: {said})" if said else text
    return text.replace("%", "%%")  # argparse formats help with %


def run(args) -> int:
    from lorakit.train import TrainingInterrupted, train

    try:
        train(config_from_args(args))
    except TrainingInterrupted as stop:
        print(f"lorakit train: {stop}", flush=True)
        return 130
    return 0
