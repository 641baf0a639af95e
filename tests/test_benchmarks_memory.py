"""Smoke test of benchmarks/memory.py: every case runs once on tiny random models (the
figures mean nothing at that size and are not checked), and the Markdown section renders."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_memory_benchmark_runs_and_renders():
    assert "memory" in BENCHMARKS
    result = memory.run(quick=True)
    levers = result["levers"]
    assert set(levers["step_ms"]) == set(memory.LEVERS) and all(ms > 0 for ms in levers["step_ms"].values())
    assert all(m["peak_mb"] > 0 for m in levers["memory"].values())
    assert 0 < result["bytes"]["nf4_vs_bf16"] < 0.5
    assert set(result["qlora"]["2x8"]["step_ms"]) == {"lorakit-nf4", "peft-bnb"}
    assert set(result["defaults"]) <= set(memory.DEFAULT_RUNS) and len(result["defaults"]) == 2
    assert result["quality"]["plain"]["validation_loss"] > 0
    predicted = result["predicted"]
    assert all(abs(r["error"]) < 1 for r in predicted.values() if "error" in r)
    assert "Llama-1B full 32x256" in predicted and "MiniLM LoRA" in predicted
    section = memory.markdown(result)
    assert section.startswith("## Memory levers") and "PEFT+bnb ms" in section
