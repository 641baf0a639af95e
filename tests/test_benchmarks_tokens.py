"""Smoke test of the trainable-tokens benchmark: it runs once at a tiny size (the times are not checked;
the contenders' parameter counts are: the rows cost PEFT and lorakit the same)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import tokens  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_tokens_benchmark_runs_quick():
    result = tokens.run(quick=True)
    assert "tokens" in BENCHMARKS
    assert set(result["step_ms"]) == set(tokens.CONTENDERS) and all(ms > 0 for ms in result["step_ms"].values())
    trainable = result["trainable_params"]
    assert trainable["lorakit"] == trainable["peft"] == trainable["lora-alone"] + len(tokens.TOKENS) * 32
    assert all(m["peak_mb"] > 0 for m in result["memory"].values())
    section = tokens.markdown(result)
    assert section.startswith("## Trainable tokens") and "| step ms |" in section
