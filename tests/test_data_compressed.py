"""lorakit.data.compressed: a data file compressed whole reads as the same file stored plainly."""

import bz2
import gzip
import lzma

import pytest

from lorakit import LorakitError
from lorakit.data import read_records
from lorakit.data.compressed import format_suffix, stem
from lorakit.data.stream import should_stream
from lorakit.tasks import get_task, read_splits

JSONL = "".join(f'{{"text": "t{i} é", "label": "{"ab"[i % 2]}"}}\n' for i in range(10))
CSV = "text,label\n" + "".join(f'"t{i}, é",{"ab"[i % 2]}\n' for i in range(10))
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def test_names_give_the_format_inside_the_compression():
    assert [format_suffix(n) for n in ("d.jsonl.gz", "d.CSV.BZ2", "d.json", "d.txt.xz")] == [
        ".jsonl", ".csv", ".json", ".txt"]
    assert [stem(n) for n in ("train.csv.gz", "train.csv", "valid.jsonl.xz")] == ["train", "train", "valid"]


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("name, content", [("d.jsonl", JSONL), ("d.csv", CSV)])
def test_a_compressed_file_reads_as_the_plain_one(tmp_path, compression, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    (tmp_path / (name + compression)).write_bytes(COMPRESS[compression](content.encode("utf-8")))
    plain = read_records(tmp_path / name, "classify")
    packed = read_records(tmp_path / (name + compression), "classify")
    assert [(r["text"], r["label"]) for r in packed] == [(r["text"], r["label"]) for r in plain]
    assert packed[3]["_where"] == f"{name}{compression} line {plain[3]['_where'].rsplit(' ', 1)[1]}"


def test_a_json_array_and_plain_text_compressed(tmp_path):
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(b'[{"prompt": "p", "completion": "c"}]'))
    assert read_records(tmp_path / "d.json.gz", "lm")[0]["completion"] == "c"
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(b"one line\n\nanother\n"))
    assert [r["text"] for r in read_records(tmp_path / "c.txt.xz", "lm")] == ["one line", "another"]
    with pytest.raises(LorakitError, match="c.txt.xz is plain text, which holds no labels"):
        read_records(tmp_path / "c.txt.xz", "classify")


def test_a_folder_of_compressed_splits(tmp_path):
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(JSONL.encode()))
    (tmp_path / "validation.csv.bz2").write_bytes(bz2.compress(CSV.encode()))
    (tmp_path / "notes.zip").write_bytes(b"PK")  # other files in the folder are left alone
    splits = read_splits(get_task("classify"), str(tmp_path))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (10, 10, 0)


def test_broken_unknown_and_misnamed_compressions_are_refused_in_one_line(tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(JSONL.encode())[:40])
    with pytest.raises(LorakitError, match="cut.jsonl.gz does not decompress as .gz .*is it whole"):
        read_records(tmp_path / "cut.jsonl.gz", "classify")
    (tmp_path / "plain.csv.gz").write_text(CSV)
    with pytest.raises(LorakitError, match="plain.csv.gz does not decompress as .gz"):
        read_records(tmp_path / "plain.csv.gz", "classify")
    (tmp_path / "d.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(LorakitError, match="d.jsonl.zst is compressed with .zst, which lorakit does not read"):
        read_records(tmp_path / "d.jsonl.zst", "classify")
    (tmp_path / "d.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(LorakitError, match="a .parquet file compresses itself"):
        read_records(tmp_path / "d.parquet.gz", "classify")
    (tmp_path / "latin.csv.gz").write_bytes(gzip.compress("text,label\ncaf\xe9,a\n".encode("latin-1")))
    with pytest.raises(LorakitError, match="latin.csv.gz is not UTF-8 text: line 2 holds the byte 0xe9"):
        read_records(tmp_path / "latin.csv.gz", "classify")


def test_a_compressed_file_is_read_whole_not_streamed(tmp_path):
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(JSONL.encode()))
    assert not should_stream(path, None)
    with pytest.raises(LorakitError, match="big.jsonl.gz cannot be streamed while compressed.*decompress it"):
        should_stream(path, True)
