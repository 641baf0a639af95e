"""``python -m benchmarks [--quick] [NAME ...]``: run benchmarks, save results/<machine>.json.

Results are merged into the machine's file by benchmark name, so running one benchmark
keeps the others' last figures. ``<machine>`` says what the machine is (CPU model, cores,
torch threads, or the GPU: :func:`benchmarks.harness.machine_name`). Each benchmark
module with a ``markdown(result) -> str`` function (a ``## Title`` section with the
machine line and the table) has its section written to ``results/<machine>.md`` and,
after a full (not ``--quick``) run, into BENCHMARKS.md, replacing that section only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from importlib import import_module
from pathlib import Path

from benchmarks.harness import machine_name

# Benchmark modules under benchmarks/, each with run(quick: bool) -> dict.
BENCHMARKS = ["svd", "serve", "training", "inference", "bottleneck", "adapters", "combine", "memory_fsdp", "dora", "memory", "own_data"]

RESULTS = Path(__file__).parent / "results"
DOC = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(section: str, path: Path = DOC) -> None:
    """Replace the ``## Title`` section of ``path`` that ``section`` starts with (or append
    it), leaving every other section as it is."""
    title = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def sections(results: dict) -> list[str]:
    """The Markdown sections of the benchmarks in ``results`` whose module has ``markdown``."""
    out = []
    for name in BENCHMARKS:
        markdown = getattr(import_module(f"benchmarks.{name}"), "markdown", None)
        if name in results and markdown is not None:
            out.append(markdown(results[name]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition: a smoke run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    path = RESULTS / f"{machine_name()}{'-quick' if args.quick else ''}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.names or BENCHMARKS:
        print(f"== {name}", flush=True)
        result = import_module(f"benchmarks.{name}").run(quick=args.quick)
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results[name] = result
        print(json.dumps(result, indent=2), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)
    ran = {name: results[name] for name in args.names or BENCHMARKS if name in results}
    report = sections(results)
    if report:
        path.with_suffix(".md").write_text("\n".join(s.rstrip("\n") + "\n" for s in report))
    if not args.quick:
        for section in sections(ran):
            write_section(section)
    print(f"results written to {path} and {path.with_suffix('.md')}" + ("" if args.quick else f"; sections of {DOC}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
