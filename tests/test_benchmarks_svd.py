"""Smoke test: the randomized-SVD benchmark still runs (small matrix, one repetition)."""

import sys
from pathlib import Path

import pytest

# benchmarks/ sits beside src/, not inside the installed package; `python -m pytest`
# from the repository root finds it, plain `pytest` needs the root on the path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import svd  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_svd_benchmark_runs_quick():
    result = svd.run(quick=True, device="cpu")
    assert "svd" in BENCHMARKS
    assert result["rank"] == 16 and result["matrix"].startswith("256x256")
    assert result["full_svd_s"] > 0 and result["randomized_svd_s"] > 0
    assert result["speedup"] == pytest.approx(result["full_svd_s"] / result["randomized_svd_s"], rel=0.01, abs=0.01)  # figures are rounded to 2 decimals
    # The accuracy half of the goal holds at any size; speed is for the real run.
    assert 1.0 - 1e-4 <= result["randomized_error_over_bound"] <= 1.01
    assert abs(result["full_svd_error_over_bound"] - 1.0) < 1e-4
