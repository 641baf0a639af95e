"""``python -m benchmarks [--quick] [--threads N] [--clock cpu|wall] [--both] [NAME ...]``: run
benchmarks, save results/<machine>.json. Without names: every benchmark but the long studies
(:data:`STUDIES`, run by name).

``--threads`` and ``--clock`` set the torch threads and what is timed (default: the
environment's, ``OMP_NUM_THREADS`` and ``LORAKIT_BENCH_CLOCK``). ``--both`` runs the side-by-side
benchmarks twice, each pass in a fresh process: at 1 thread in CPU seconds (the figures
BENCHMARKS.md takes on a shared machine, ``## Title`` sections) and at 2 threads in wall seconds
(``## Title (2 threads, wall clock)``), with each pass's total time in ``## Benchmark runs``.

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
BENCHMARKS = ["svd", "serve", "training", "inference", "bottleneck", "adapters", "products", "combine", "memory_fsdp", "dora",
              "tokens", "memory", "own_data"]
# Studies that train for many minutes each (the memory levers, runs on labelled datasets): run by name only, so
# that ``make bench`` (the comparisons with the peers) stays within about half an hour on two cores.
STUDIES = ["memory", "own_data"]
DEFAULT = [name for name in BENCHMARKS if name not in STUDIES]
# the side-by-side ones whose sections name their threads and clock (--both runs them)
SIDE_BY_SIDE = ["training", "inference", "bottleneck", "adapters", "products"]
PASSES = [("1", "cpu"), ("2", "wall")]  # --both: (torch threads, clock)

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
        if name not in results:  # only those run: another benchmark may need packages this machine lacks
            continue
        markdown = getattr(import_module(f"benchmarks.{name}"), "markdown", None)
        if markdown is not None:
            out.append(markdown(results[name]))
    return out


def runs_section(runs: list[dict]) -> str:
    """The ``## Benchmark runs`` section: each pass of the last ``--both`` run and its total time."""
    rows = "".join(f"| {r['pass']} | {', '.join(r['names'])} | `{r['results']}` | {r['total_s'] / 60:.1f} min |\n"
                   for r in runs)
    return ("## Benchmark runs\n\nThe last run of `python -m benchmarks` over several benchmarks (`make bench`: all but "
            f"the studies, 2 threads, wall clock; or `--both`), {time.strftime('%Y-%m-%d')}; total "
            f"{sum(r['total_s'] for r in runs) / 60:.1f} min.\n\n"
            "| pass | benchmarks | results | total time |\n|---|---|---|---|\n" + rows)


def both(names: list[str], quick: bool) -> int:
    """Run ``names`` once per pass of :data:`PASSES`, each in a fresh process; write their times."""
    import subprocess
    import sys

    runs = []
    for threads, clock in PASSES:
        env = dict(os.environ, OMP_NUM_THREADS=threads, LORAKIT_BENCH_CLOCK=clock, LORAKIT_BENCH_PASS="1")
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks", *(["--quick"] if quick else []), *names]
        code = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent).returncode
        if code:
            return code
        label = f"{threads} thread{'s' if threads != '1' else ''}, {'CPU seconds' if clock == 'cpu' else 'wall clock'}"
        results = subprocess.run([sys.executable, "-c", "from benchmarks.harness import machine_name; print(machine_name())"],
                                 env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        runs.append({"pass": label, "names": names, "total_s": time.perf_counter() - started,
                     "results": f"benchmarks/results/{results.stdout.strip()}{'-quick' if quick else ''}.json"})
        print(f"== pass {label}: {runs[-1]['total_s'] / 60:.1f} min", flush=True)
    if not quick:
        write_section(runs_section(runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: {', '.join(DEFAULT)}; by name only: "
                        f"{', '.join(STUDIES)})")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition: a smoke run")
    parser.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS or torch's own)")
    parser.add_argument("--clock", choices=["cpu", "wall"], help="time CPU seconds or wall seconds "
                        "(default: LORAKIT_BENCH_CLOCK, else wall)")
    parser.add_argument("--both", action="store_true", help=f"run {', '.join(SIDE_BY_SIDE)} (or NAME ...) at 1 thread "
                        "in CPU seconds, then at 2 threads in wall seconds, and record each pass's total time")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.both:
        return both(args.names or SIDE_BY_SIDE, args.quick)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the fresh processes that measure memory
    if args.clock:
        os.environ["LORAKIT_BENCH_CLOCK"] = args.clock

    started = time.perf_counter()
    path = RESULTS / f"{machine_name()}{'-quick' if args.quick else ''}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.names or DEFAULT:
        print(f"== {name}", flush=True)
        result = import_module(f"benchmarks.{name}").run(quick=args.quick)
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results[name] = result
        print(json.dumps(result, indent=2), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)
        if not args.quick:  # each section as soon as its benchmark is done (a run cut short keeps them)
            for section in sections({name: result}):
                write_section(section)
    report = sections(results)
    if report:
        path.with_suffix(".md").write_text("\n".join(s.rstrip("\n") + "\n" for s in report))
    if not args.quick:
        # the whole set (``make bench``) only: a few benchmarks run by name are no record of it; --both: the parent
        if not args.names and not os.environ.get("LORAKIT_BENCH_PASS"):
            import torch

            clock = os.environ.get("LORAKIT_BENCH_CLOCK", "wall")
            label = f"{torch.get_num_threads()} thread(s), {'CPU seconds' if clock == 'cpu' else 'wall clock'}"
            write_section(runs_section([{"pass": label, "names": args.names or DEFAULT, "total_s":
                                         time.perf_counter() - started, "results": f"benchmarks/results/{path.name}"}]))
    print(f"results written to {path} and {path.with_suffix('.md')}" + ("" if args.quick else f"; sections of {DOC}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
