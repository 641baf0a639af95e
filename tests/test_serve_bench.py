"""Smoke test: the serving benchmark still runs (toy model, one repetition)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ sits beside src/ (see test_bench_svd.py)
    sys.path.insert(0, str(ROOT))

from benchmarks import serve  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_serve_benchmark_runs_quick(tmp_path):
    result = serve.run(quick=True)
    assert "serve" in BENCHMARKS
    assert set(result["tokens_per_s"]) == {"base", "1", "8", "32", "8-one-after-another", "32-one-after-another"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert result["cold_load_ms"] > 0
    section = serve.markdown({**result, "repeats": 1})
    assert section.startswith("## Serving") and "tokens/s" in section
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n## Other\nkept\n")
    serve.write_section(section, target)
    serve.write_section(section, target)  # replacing, not appending
    text = target.read_text()
    assert text.count("## Serving") == 1 and "## Other\nkept" in text
