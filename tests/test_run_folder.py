"""lorakit.run_folder: which --out folders a run may write into, and finding a run's trained result."""

import json

import pytest

from lorakit import LorakitError
from lorakit.run_folder import MARKER, TASK_FILE, RunFolder, adapter_folder, trained_folder


def test_new_and_empty_folders_are_claimed_and_a_foreign_one_only_with_overwrite(tmp_path):
    RunFolder.claim(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("x")  # hidden entries do not count
    RunFolder.claim(tmp_path / "empty").mark()
    assert (tmp_path / "empty" / MARKER).is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("a.csv", "b", "c", "d", "e", "f"):
        (foreign / name).write_text("x")
    with pytest.raises(LorakitError, match=r"not empty and was not written by lorakit train \(it holds a.csv, b, c, "
                                           r"d, e and 1 more\).*--overwrite"):
        RunFolder.claim(foreign)
    RunFolder.claim(foreign, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match="is a file"):
        RunFolder.claim(tmp_path / "file")


def test_a_run_folder_from_before_the_marker_is_recognised(tmp_path):
    old = tmp_path / "old"
    (old / "state" / "last").mkdir(parents=True)
    (old / "adapter").mkdir()
    (old / "adapter" / TASK_FILE).write_text("{}")
    (old / "metrics.jsonl").write_text("")
    assert RunFolder(old).is_run()
    RunFolder.claim(old)
    (old / "notes.txt").write_text("mine")  # no longer only a run's files
    assert not RunFolder(old).is_run()


def test_saving_a_result_replaces_lorakit_files_only(tmp_path):
    run = RunFolder.claim(tmp_path / "run")
    run.mark()
    run.save_result("adapter", lambda d: [(d / n).write_text("1") for n in ("weights", "shard-2", TASK_FILE)])
    (run.root / "adapter" / "mine.txt").write_text("mine")
    run.save_result("adapter", lambda d: [(d / n).write_text("2") for n in ("weights", TASK_FILE)])
    assert sorted(p.name for p in (run.root / "adapter").iterdir()) == [TASK_FILE, "mine.txt", "weights"]
    assert json.loads((run.root / MARKER).read_text())["saved"] == {"adapter": [TASK_FILE, "weights"]}


def test_the_trained_result_of_a_run_folder_is_found_and_every_other_case_named(tmp_path):
    run = RunFolder.claim(tmp_path / "run")
    run.mark()
    with pytest.raises(LorakitError, match="holds no trained result yet.*--resume"):
        trained_folder(run.root)
    run.save_result("adapter", lambda d: (d / TASK_FILE).write_text("{}"))
    assert trained_folder(run.root) == run.root / "adapter"
    assert trained_folder(run.root / "adapter") == run.root / "adapter"
    run.save_result("model", lambda d: (d / TASK_FILE).write_text("{}"))
    with pytest.raises(LorakitError, match="several trained results \\(adapter, model\\)"):
        trained_folder(run.root)
    with pytest.raises(LorakitError, match="does not exist"):
        trained_folder(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(LorakitError, match="holds neither lorakit_task.json nor a lorakit train run"):
        trained_folder(tmp_path / "other")


def test_an_adapter_folder_is_itself_and_a_run_folder_its_adapter(tmp_path):
    peft_folder = tmp_path / "peft"
    peft_folder.mkdir()
    (peft_folder / "adapter_config.json").write_text("{}")
    assert adapter_folder(peft_folder) == peft_folder  # no lorakit_task.json: still an adapter folder
    assert adapter_folder(tmp_path / "nowhere") == tmp_path / "nowhere"  # the reader names what is missing
    run = RunFolder.claim(tmp_path / "run")
    run.mark()
    with pytest.raises(LorakitError, match="no trained result yet"):
        adapter_folder(run.root)
    run.save_result("adapter", lambda d: (d / TASK_FILE).write_text("{}"))
    assert adapter_folder(run.root) == run.root / "adapter"


def test_an_out_folder_under_a_file_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LorakitError, match="lies under .*notes.txt, which is a file"):
        RunFolder.claim(tmp_path / "notes.txt" / "run")
    assert (tmp_path / "notes.txt").read_text() == "mine"
