"""`lorakit sweep`: every configuration trained once, the smallest good one marked, resume after a stop."""

import json
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.sweep import choose_smallest, parse_ranks, parse_targets, run_sweep
from lorakit.train import TrainingInterrupted

# accuracy each (targets, rank) reaches in the fake trainer
ACCURACY = {("query", 1): 0.70, ("query", 4): 0.78, ("query", 16): 0.80,
            ("query,value", 1): 0.801, ("query,value", 4): 0.804, ("query,value", 16): 0.802}


class FakeTrainer:
    """Stands in for lorakit.train.train: a report like the real one, with a stop after N runs."""

    def __init__(self, stop_at: int | None = None):
        self.calls = []
        self.stop_at = stop_at

    def __call__(self, config):
        self.calls.append((",".join(config.targets), config.rank, config.resume))
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise TrainingInterrupted("stopped at step 3 of 5")
        targets = ",".join(config.targets)
        params = 2 * 384 * config.rank * 6 * len(config.targets) + 770
        return {"metric": "accuracy", "validation_after": {"accuracy": ACCURACY[(targets, config.rank)], "loss": 0.5},
                "trainable_params": params, "train_time_s": 1.5, "wall_time_s": 2.0,
                "memory": {"peak_rss_bytes": 2**40}, "test": None, "settings": self.chosen(config.settings())}

    @staticmethod
    def chosen(settings: dict) -> dict:
        """The settings as the real report gives them: what the recipe chose in place of None."""
        return {**settings, **{k: v for k, v in {"batch_size": 8, "lr": 1e-3, "max_length": 16}.items()
                               if settings.get(k) is None}}


def test_parse_ranks_and_targets():
    assert parse_ranks("16, 1,4,4") == [1, 4, 16]
    targets = parse_targets(["value,query", "query", "query,value", "all-linear"])
    assert targets == ["query,value", "query", "all-linear"]
    with pytest.raises(LorakitError, match="'two' is not a positive integer"):
        parse_ranks("1,two")
    with pytest.raises(LorakitError, match="'0' is not a positive integer"):
        parse_ranks("0,1")


def test_choose_smallest_within_tolerance():
    rows = [{"trainable_params": 10, "points": 79.0}, {"trainable_params": 20, "points": 80.2},
            {"trainable_params": 40, "points": 80.4}, {"trainable_params": 5, "points": 70.0}]
    assert choose_smallest(rows, 0.5)["trainable_params"] == 20
    assert choose_smallest(rows, 2.0)["trainable_params"] == 10
    assert choose_smallest(rows, 0.0)["trainable_params"] == 40
    losses = [{"trainable_params": 10, "points": 1.30}, {"trainable_params": 20, "points": 1.0}]
    assert choose_smallest(losses, 0.5, higher_is_better=False)["trainable_params"] == 10


def test_sweep_trains_each_configuration_and_marks_the_smallest(tmp_path):
    fake = FakeTrainer()
    result = run_sweep([1, 4, 16], ["query", "query,value"], tmp_path, train_fn=fake, steps=5, say=lambda *a: None)
    assert [(t, r) for t, r, _ in fake.calls] == [(t, r) for t in ("query", "query,value") for r in (1, 4, 16)]
    # best: 80.4 (query,value r=4); within 0.5 points: query r=16 (80.0, 74,498 params) and
    # query,value r=1 (80.1, 9,986 params): the smaller is chosen
    assert (result.chosen["targets"], result.chosen["rank"]) == ("query,value", 1)
    assert result.chosen["trainable_params"] == 2 * 384 * 1 * 6 * 2 + 770
    assert result.plot.is_file()
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["points"] == pytest.approx(70.0)
    if Path("/proc/self/clear_refs").exists():  # Linux: each row's own peak, not the process's 1 TiB report
        assert all(0 < r["peak_memory_bytes"] < 2**40 for r in result.rows)


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    first = FakeTrainer(stop_at=3)  # the third configuration is interrupted
    with pytest.raises(TrainingInterrupted):
        run_sweep("1,4,16", ["query"], tmp_path, train_fn=first, steps=5, plot=False, say=lambda *a: None)
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 2
    (tmp_path / "query-r16" / "state" / "last").mkdir(parents=True)  # the checkpoint the real trainer leaves
    (tmp_path / "query-r16" / "state" / "last" / "meta.json").write_text("{}")
    second = FakeTrainer()
    result = run_sweep("1,4,16", ["query"], tmp_path, train_fn=second, steps=5, plot=False, say=lambda *a: None)
    assert second.calls == [("query", 16, True)]  # only the unfinished one, resumed from its checkpoint
    assert [r["rank"] for r in result.rows] == [1, 4, 16]
    third = FakeTrainer()
    run_sweep("1,4,16", ["query"], tmp_path, train_fn=third, steps=5, plot=False, say=lambda *a: None)
    assert third.calls == []


def test_cut_last_line_is_trained_again_and_other_settings_are_refused(tmp_path):
    run_sweep("1", ["query"], tmp_path, train_fn=FakeTrainer(), steps=5, plot=False, say=lambda *a: None)
    with open(tmp_path / "sweep.jsonl", "a") as handle:
        handle.write('{"targets": "query", "rank": 4, "trainable')  # a crash mid-write
    again = FakeTrainer()
    run_sweep("1,4", ["query"], tmp_path, train_fn=again, steps=5, plot=False, say=lambda *a: None)
    assert [c[:2] for c in again.calls] == [("query", 4)]
    with pytest.raises(LorakitError, match="other settings.*steps"):
        run_sweep("1,4,16", ["query"], tmp_path, train_fn=FakeTrainer(), steps=7, plot=False, say=lambda *a: None)


def test_cli_prints_the_table_with_the_mark(tmp_path, capsys, monkeypatch):
    from lorakit.cli import main
    import lorakit.sweep as sweep

    fake = FakeTrainer()
    real = sweep.run_sweep
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: real(*a, train_fn=fake, **k))
    assert main(["sweep", "--ranks", "1,4", "--targets", "query", "--targets", "query,value",
                 "--steps", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if line.rstrip().endswith("*")]
    assert len(marked) == 1 and marked[0].split()[:2] == ["query,value", "1"]
    assert "80.40" in out and "smallest within 0.5 points" in out
