"""`lorakit <verb>`: argument parsing and printing only.

Each verb lives in its own module under this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed arguments and returning an exit code. Everything a verb does is
one library call a user could make from Python.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from lorakit import __version__
from lorakit.errors import LorakitError

# Verb modules, in the order `lorakit --help` lists them.
COMMAND_MODULES = [
    "train",
    "evaluate",
    "predict",
    "generate",
    "approx",
    "serve",
    "inspect",
    "analyze",
    "spectrum",
    "extract",
    "combine",
    "export",
    "sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Low-Rank Adaptation (LoRA): approximate, attach, train, analyse and serve adapters.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        import_module(f"lorakit.cli.{name}").register(subparsers)
    return parser


def show_warnings_briefly() -> None:
    """Print warnings as one line ``warning: ...`` (without the source line Python adds)."""
    import warnings

    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    show_warnings_briefly()
    command = "lorakit"  # named once the arguments are parsed: Ctrl-C while the verbs import is said as plainly
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        command = f"lorakit {args.command}"
        return int(args.func(args) or 0)
    except LorakitError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
