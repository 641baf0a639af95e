"""Smoke test of the combine benchmark: it runs once at a tiny size (the figures are not checked)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import combine  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_combine_benchmark_runs_quick():
    result = combine.run(quick=True)
    assert "combine" in BENCHMARKS
    assert set(result["ms"]) == set(combine.METHODS) and result["layers"] == 14
    assert all(r["lorakit"] > 0 and r["peft"] > 0 and r["vs_peft"] > 0 for r in result["ms"].values())
    section = combine.markdown(result)
    assert section.startswith("## Combining adapters") and "| ties |" in section
