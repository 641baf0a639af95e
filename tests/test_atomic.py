"""lorakit.atomic: files replaced whole or not at all, folders swapped, nothing of others deleted."""

import os
import stat

import pytest

from lorakit import atomic


def test_a_file_is_replaced_whole_readable_by_others_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic.write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    atomic.write_text(path, "second")
    assert path.read_text() == "second" and os.listdir(path.parent) == ["report.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "weights.bin"
    atomic.write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic.writing(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.bin"]


def test_replace_folder_keeps_the_old_one_when_writing_fails(tmp_path):
    dest = tmp_path / "ckpt"
    atomic.replace_folder(dest, lambda d: (d / "a").write_text("1"))

    def broken(d):
        (d / "a").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.replace_folder(dest, broken)
    assert (atomic.existing_folder(dest) / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replace_folder_moves_what_it_did_not_write_into_the_new_folder(tmp_path):
    dest = tmp_path / "adapter"
    atomic.replace_folder(dest, lambda d: [(d / n).write_text("v1") for n in ("weights", "stale")])
    (dest / "notes.txt").write_text("mine")
    (dest / "plots").mkdir()
    (dest / "plots" / "p.png").write_text("png")
    atomic.replace_folder(dest, lambda d: (d / "weights").write_text("v2"), discard=["weights", "stale"])
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt", "plots", "weights"]
    assert (dest / "weights").read_text() == "v2" and (dest / "notes.txt").read_text() == "mine"
    assert (dest / "plots" / "p.png").read_text() == "png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_swap_cut_short_by_a_crash_is_finished_by_the_next_one(tmp_path):
    dest, old = tmp_path / "adapter", tmp_path / ".adapter.old"
    # died between the two renames: only .old is left, and it is what existing_folder finds
    old.mkdir()
    (old / "weights").write_text("v1")
    (old / "notes.txt").write_text("mine")
    assert atomic.existing_folder(dest) == old
    atomic.replace_folder(dest, lambda d: (d / "weights").write_text("v2"), discard=["weights"])
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt", "weights"] and not old.exists()
    # died after both renames, before the user's file was moved over
    old.mkdir()
    (old / "weights").write_text("v2")
    (old / "more.txt").write_text("mine too")
    atomic.replace_folder(dest, lambda d: (d / "weights").write_text("v3"), discard=["weights"])
    assert sorted(p.name for p in dest.iterdir()) == ["more.txt", "notes.txt", "weights"]
    assert (dest / "weights").read_text() == "v3" and not old.exists()
