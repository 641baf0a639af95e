"""lorakit's benchmarks: run them all with ``python -m benchmarks`` (or ``make bench``).

Each module here has ``run(quick: bool) -> dict`` and is listed in ``BENCHMARKS`` in
``benchmarks/__main__.py``. Benchmarks are never part of the test suite; each has a
smoke test that runs it once with ``quick=True`` so it cannot rot.
"""
