"""``python -m benchmarks [--quick] [NAME ...]``: run benchmarks, save results/<machine>.json.

Results are merged into the machine's file by benchmark name, so running one benchmark
keeps the others' last figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import time
from importlib import import_module
from pathlib import Path

# Benchmark modules under benchmarks/, each with run(quick: bool) -> dict.
BENCHMARKS = ["svd", "serve"]

RESULTS = Path(__file__).parent / "results"


def machine_name() -> str:
    """A file-name-safe name for this machine (override with LORAKIT_BENCH_MACHINE)."""
    name = os.environ.get("LORAKIT_BENCH_MACHINE") or socket.gethostname() or platform.node() or "machine"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


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
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
