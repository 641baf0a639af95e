"""lorakit.data.readers: Parquet files, and columns named otherwise (--text-column ...)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorakit import LorakitError
from lorakit.data import read_records
from lorakit.tasks import get_task, read_splits


def test_a_parquet_file_reads_as_records_with_its_row_numbers(tmp_path):
    pq.write_table(pa.table({"text": ["good", "bad", "fine"], "label": [1, 0, 1]}), tmp_path / "d.parquet")
    records = read_records(tmp_path / "d.parquet", "classify")
    assert records == [{"text": "good", "label": "1", "_where": "d.parquet row 1"},
                       {"text": "bad", "label": "0", "_where": "d.parquet row 2"},
                       {"text": "fine", "label": "1", "_where": "d.parquet row 3"}]


def test_a_parquet_chat_file_with_its_own_column_names(tmp_path):
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 3
    pq.write_table(pa.table({"dialog": chats}), tmp_path / "c.parquet")
    records = read_records(tmp_path / "c.parquet", "lm", columns={"messages": "dialog"})
    assert records[2] == {"messages": chats[0], "_where": "c.parquet row 3"}
    pq.write_table(pa.table({"q": ["a"], "a": ["b"]}), tmp_path / "p.parquet")
    assert read_records(tmp_path / "p.parquet", "lm", columns={"prompt": "q", "completion": "a"})[0]["completion"] == "b"


def test_csv_columns_named_otherwise_and_a_folder_of_parquet_files(tmp_path):
    (tmp_path / "d.csv").write_text("review,stars\ngreat film,5\ndull,1\n")
    records = read_records(tmp_path / "d.csv", "classify", columns={"text": "review", "label": "stars"})
    assert [(r["text"], r["label"]) for r in records] == [("great film", "5"), ("dull", "1")]
    with pytest.raises(LorakitError, match=r"d.csv line 2 lacks 'text'; it has keys \['review', 'stars'\]"):
        read_records(tmp_path / "d.csv", "classify", columns={"label": "stars"})
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, n in (("train", 8), ("validation", 2)):
        pq.write_table(pa.table({"text": [f"t{i}" for i in range(n)], "label": ["a", "b"] * (n // 2)}),
                       folder / f"{name}.parquet")
    splits = read_splits(get_task("classify"), str(folder))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (8, 2, 0)


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_csv_split_by_what_a_spreadsheet_writes_is_read_by_its_header(tmp_path, delimiter):
    """Spreadsheets in many locales save "CSV" with semicolons (the comma being their decimal mark)."""
    d = delimiter
    (tmp_path / "d.csv").write_text(f'text{d}label\n"great, really"{d}pos\ndull{d}neg\n', encoding="utf-8-sig")
    records = read_records(tmp_path / "d.csv", "classify")
    assert [(r["text"], r["label"]) for r in records] == [("great, really", "pos"), ("dull", "neg")]
    (tmp_path / "c.csv").write_text(f'text,label\nfine; really,pos\n')  # a comma in the header: commas
    assert read_records(tmp_path / "c.csv", "classify")[0]["text"] == "fine; really"
    (tmp_path / "x.csv").write_text(f'text{d}label\na{d}b{d}c\n')
    with pytest.raises(LorakitError, match="quote values that contain"):
        read_records(tmp_path / "x.csv", "classify")


def test_a_sharegpt_chat_file_reads_as_messages_with_no_flag(tmp_path):
    import json

    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": turns, "id": "x1"}) + "\n")
    assert read_records(tmp_path / "c.jsonl", "lm")[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"dialog": turns}) + "\n")  # under another name: the flag
    assert read_records(tmp_path / "d.jsonl", "lm", columns={"messages": "dialog"})[0]["messages"][1]["role"] == "user"
    (tmp_path / "b.jsonl").write_text(json.dumps({"conversations": [{"from": "bot", "value": "hi"}]}) + "\n")
    with pytest.raises(LorakitError, match=r"b.jsonl line 1: messages\[0\] is .*'bot'.*ShareGPT's 'from' in"):
        read_records(tmp_path / "b.jsonl", "lm")


def test_a_plain_text_file_is_a_text_record_a_line_and_holds_no_labels(tmp_path):
    (tmp_path / "corpus.txt").write_text("The first line.\n\n  The second, indented.\r\n")
    assert read_records(tmp_path / "corpus.txt", "lm") == [
        {"text": "The first line.", "_where": "corpus.txt line 1"},
        {"text": "  The second, indented.", "_where": "corpus.txt line 3"}]
    with pytest.raises(LorakitError, match="corpus.txt is plain text, which holds no labels"):
        read_records(tmp_path / "corpus.txt", "classify")


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "bad.parquet").write_text("text,label\n")
    with pytest.raises(LorakitError, match="bad.parquet does not read as Parquet"):
        read_records(tmp_path / "bad.parquet", "classify")


def test_a_json_array_a_json_lines_file_and_a_tsv_read_as_records(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "good", "label": 1},\n {"text": "bad", "label": 0}]')
    assert read_records(tmp_path / "a.json", "classify") == [
        {"text": "good", "label": "1", "_where": "a.json item 1"},
        {"text": "bad", "label": "0", "_where": "a.json item 2"}]
    (tmp_path / "l.json").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert [r["_where"] for r in read_records(tmp_path / "l.json", "classify")] == ["l.json line 1", "l.json line 2"]
    (tmp_path / "d.tsv").write_text('review\tstars\ngreat, really\t5\ndull\t1\n')
    records = read_records(tmp_path / "d.tsv", "classify", columns={"text": "review", "label": "stars"})
    assert [(r["text"], r["label"], r["_where"]) for r in records] == [("great, really", "5", "d.tsv line 2"),
                                                                       ("dull", "1", "d.tsv line 3")]
    alpaca = '[{"instruction": "Say hi", "input": "", "output": "Hi"}]'
    (tmp_path / "alpaca.json").write_text(alpaca)
    assert read_records(tmp_path / "alpaca.json", "lm", columns={"prompt": "instruction", "completion": "output"}
                        )[0]["completion"] == "Hi"


@pytest.mark.parametrize("name, content, message", [
    ("o.json", '{"data": [{"text": "a", "label": 1}]}', r"o.json holds one JSON object \(keys \['data'\]\), not an array"),
    ("b.json", '[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]',
     r"b.json is not valid JSON \(Expecting ',' delimiter at line 2 column 15\)"),
    ("n.json", '[{"text": "a", "label": 1}, 3]', r"n.json item 2 holds a JSON number, not a JSON object"),
    ("t.tsv", 'text\tlabel\na\t1\tx\n', r"t.tsv line 2 has more fields than the header .* contain tabs"),
])
def test_a_json_or_tsv_file_of_another_shape_is_named_with_where_it_breaks(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LorakitError, match=message):
        read_records(tmp_path / name, "classify")


# ---------------------------------------------------------------- what a careless user's files hold


def test_a_column_named_twice_is_refused_in_csv_and_parquet(tmp_path):
    (tmp_path / "d.csv").write_text("text,label,label\ngood,pos,x\nbad,neg,y\n")
    with pytest.raises(LorakitError, match="d.csv names the column 'label' twice"):
        read_records(tmp_path / "d.csv", "classify")
    table = pa.Table.from_arrays([pa.array(["a", "b"]), pa.array(["p", "n"]), pa.array(["x", "y"])],
                                 names=["text", "label", "label"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(LorakitError, match="d.parquet names the column 'label' twice"):
        read_records(tmp_path / "d.parquet", "classify")


def test_a_tsv_line_is_one_record_whatever_quotes_it_holds(tmp_path):
    lines = ["text\tlabel"] + [f"review {i}\tpos" for i in range(10)]
    lines[3] = '"so-called" hit, a "quoted\tneg'
    (tmp_path / "q.tsv").write_text("\n".join(lines) + "\n")
    records = read_records(tmp_path / "q.tsv", "classify")
    assert len(records) == 10 and records[2]["text"] == '"so-called" hit, a "quoted' and records[2]["label"] == "neg"


def test_missing_values_empty_labels_and_utf16_are_named_plainly(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n')
    with pytest.raises(LorakitError, match="n.jsonl line 2 has no value for 'label' \\(null or NaN\\); fill it in"):
        read_records(tmp_path / "n.jsonl", "classify")
    pq.write_table(pa.table({"text": ["a", "b"], "label": pa.array([1.0, float("nan")], from_pandas=False)}),
                   tmp_path / "n.parquet")
    with pytest.raises(LorakitError, match="n.parquet row 2 has no value for 'label'"):
        read_records(tmp_path / "n.parquet", "classify")
    (tmp_path / "e.csv").write_text("text,label\na,pos\nb,\n")
    with pytest.raises(LorakitError, match="e.csv line 3: 'label' is empty; fill it in or remove the line"):
        read_records(tmp_path / "e.csv", "classify")
    (tmp_path / "u.csv").write_bytes("text,label\na,pos\n".encode("utf-16"))
    with pytest.raises(LorakitError, match="u.csv is UTF-16 text .*iconv -f utf-16 -t utf-8"):
        read_records(tmp_path / "u.csv", "classify")


def test_a_data_folder_with_two_train_files_is_refused_and_upper_case_suffixes_are_found(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(8)))
    (tmp_path / "validation.CSV").write_text("text,label\nv,a\nw,b\n")
    splits = read_splits(get_task("classify"), str(tmp_path))
    assert (len(splits.train), len(splits.validation)) == (8, 2)
    (tmp_path / "train.jsonl").write_text('{"text": "x", "label": "a"}\n')
    with pytest.raises(LorakitError, match="has 2 train files \\(train.csv, train.jsonl\\); keep one"):
        read_splits(get_task("classify"), str(tmp_path))
