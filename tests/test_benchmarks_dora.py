"""Smoke test of the DoRA benchmark: it runs once at a tiny size (the figures are not checked)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import dora  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_dora_benchmark_runs_quick():
    result = dora.run(quick=True)
    assert "dora" in BENCHMARKS
    for case in ("minilm", "smollm2"):
        r = result[case]
        assert set(r["step_ms"]) == set(dora.CONTENDERS) and all(ms > 0 for ms in r["step_ms"].values())
        trainable = r["trainable_params"]  # DoRA adds one magnitude per output feature to LoRA's factors
        assert trainable["lorakit-dora"] == trainable["peft-dora"] > trainable["lorakit-lora"]
    assert set(result["per_row"]["forward_ms"]) == {"16", "1", "active"}
    section = dora.markdown(result)
    assert section.startswith("## DoRA") and "| lorakit DoRA ms |" in section
