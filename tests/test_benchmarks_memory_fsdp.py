"""Smoke test of the FSDP memory benchmark: DDP and FSDP runs of 2 CPU processes at a tiny size.

Timings and resident sets are not checked (noise at this size); the bytes of the parameters
each process holds are exact, and under FSDP they are each process's half of the model."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory_fsdp  # noqa: E402
from benchmarks.__main__ import BENCHMARKS  # noqa: E402


def test_fsdp_processes_hold_half_the_weights_of_ddp_ones():
    result = memory_fsdp.run(quick=True)
    assert "memory_fsdp" in BENCHMARKS
    ddp, fsdp = result["modes"]["ddp"], result["modes"]["fsdp"]
    assert [r["rank"] for r in ddp] == [r["rank"] for r in fsdp] == [0, 1]
    assert {r["units"] for r in fsdp} == {2} and {r["units"] for r in ddp} == {0}  # two blocks sharded
    for whole, half in zip(ddp, fsdp):
        for kind in ("frozen_bytes", "trainable_bytes"):  # dim 0 split in two (an odd row to one of them)
            assert 0.95 <= half[kind] / (whole[kind] / 2) <= 1.05, kind
        assert whole["memory"]["peak_mb"] > 0 and half["memory"]["peak_mb"] > 0
    assert 0.5 <= result["frozen_vs_ddp"] <= memory_fsdp.GOAL
    section = memory_fsdp.markdown(result)
    assert section.startswith("## FSDP memory") and "| fsdp rank 1 |" in section


def test_a_run_killed_by_a_signal_is_started_again_once_and_any_other_failure_raises(monkeypatch):
    outcomes = [(None, "the ddp run failed:\nexitcode  : -6 (pid: 1)  (SIGABRT)"), ([{"rank": 0}, {"rank": 1}], "")]
    monkeypatch.setattr(memory_fsdp, "_run_once", lambda mode, quick: outcomes.pop(0))
    with pytest.warns(RuntimeWarning, match="starting the ddp run again"):
        assert memory_fsdp.run_mode("ddp", True) == [{"rank": 0}, {"rank": 1}]

    aborts = iter([(None, "(SIGABRT) first"), (None, "(SIGABRT) second")])
    monkeypatch.setattr(memory_fsdp, "_run_once", lambda mode, quick: next(aborts))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="second"):
        memory_fsdp.run_mode("ddp", True)

    monkeypatch.setattr(memory_fsdp, "_run_once", lambda mode, quick: (None, "ModuleNotFoundError: lorakit"))
    with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
        memory_fsdp.run_mode("fsdp", True)
