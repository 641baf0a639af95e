"""Smoke test: the serving benchmark still runs (toy model, tiny sizes) and reports every figure."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ sits beside src/ (see test_benchmarks_svd.py)
    sys.path.insert(0, str(ROOT))

from benchmarks import serve  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_serve_benchmark_runs_quick():
    result = serve.run(quick=True)
    assert "serve" in BENCHMARKS
    assert set(result["tokens_per_s"]) == {"lorakit_mixed", "lorakit_one_adapter", "peft_generate_mixed", "base_generate"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    cold = result["load_on_demand"]
    assert cold["load_adapter_ms"] > 0 and cold["cold_first_token_ms"] > 0
    burst = result["burst"]
    assert burst["sent"] == 4 * result["queue"] and burst["lost"] == 0
    assert burst["accepted"] + burst["refused_429"] == burst["sent"]
    assert burst["accepted_completed"] == burst["accepted"]
    section = serve.markdown(result)
    assert section.startswith("## Serving") and "tokens/s" in section and "429" in section
