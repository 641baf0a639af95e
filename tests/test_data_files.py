"""lorakit.data.files: each file format read into raw records, with where each came from."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorakit import LorakitError
from lorakit.data import read_records


def test_a_parquet_file_reads_as_records_with_its_row_numbers(tmp_path):
    pq.write_table(pa.table({"text": ["good", "bad", "fine"], "label": [1, 0, 1]}), tmp_path / "d.parquet")
    records = read_records(tmp_path / "d.parquet", "classify")
    assert records == [{"text": "good", "label": "1", "_where": "d.parquet row 1"},
                       {"text": "bad", "label": "0", "_where": "d.parquet row 2"},
                       {"text": "fine", "label": "1", "_where": "d.parquet row 3"}]


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


def test_one_json_object_of_columns_or_of_records_under_one_key_is_read_as_its_records(tmp_path):
    """The two object shapes Hugging Face datasets reads: columns (pandas' to_dict("list")) and
    the records under one key (its ``field``, e.g. "data")."""
    (tmp_path / "c.json").write_text('{"text": ["good", "bad"], "label": [1, 0]}')
    assert read_records(tmp_path / "c.json", "classify") == [
        {"text": "good", "label": "1", "_where": "c.json item 1"},
        {"text": "bad", "label": "0", "_where": "c.json item 2"}]
    (tmp_path / "d.json").write_text('{"data": [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]}')
    assert [(r["text"], r["_where"]) for r in read_records(tmp_path / "d.json", "classify")] == [
        ("good", "d.json item 1"), ("bad", "d.json item 2")]


@pytest.mark.parametrize("name, content, message", [
    ("o.json", '{"text": ["a", "b"], "label": [1]}', r"o.json holds one JSON object \(keys \['label', 'text'\]\), "
     "neither records nor columns of one length"),
    ("b.json", '[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]',
     r"b.json is not valid JSON \(Expecting ',' delimiter at line 2 column 15\)"),
    ("n.json", '[{"text": "a", "label": 1}, 3]', r"n.json item 2 holds a JSON number, not a JSON object"),
    ("t.tsv", 'text\tlabel\na\t1\tx\n', r"t.tsv line 2 has more fields than the header .* contain tabs"),
])
def test_a_json_or_tsv_file_of_another_shape_is_named_with_where_it_breaks(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LorakitError, match=message):
        read_records(tmp_path / name, "classify")


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


def test_an_excel_workbook_reads_its_first_sheet_a_record_a_row(tmp_path):
    import datetime

    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "labelled"
    for row in (["Text", "label", "when"], ["great film", 1, datetime.date(2026, 1, 2)], [None, None, None],
                ["dull", 0, None]):
        sheet.append(row)
    book.create_sheet("notes").append(["not", "data"])
    book.save(tmp_path / "reviews.xlsx")
    with pytest.warns(UserWarning, match="has 2 worksheets; lorakit reads the first, 'labelled'"):
        records = read_records(tmp_path / "reviews.xlsx", "classify")  # "Text" read as text, as in a csv
    assert [(r["text"], r["label"], r["_where"]) for r in records] == [
        ("great film", "1", "reviews.xlsx row 2"), ("dull", "0", "reviews.xlsx row 4")]
    # a table that starts lower down (pandas' to_excel(startrow=...)): the empty rows above the header are skipped
    lower = openpyxl.Workbook()
    for row in ([None, None], [None, None], ["text", "label"], ["fine", "pos"]):
        lower.active.append(row)
    lower.save(tmp_path / "lower.xlsx")
    assert [(r["text"], r["_where"]) for r in read_records(tmp_path / "lower.xlsx", "classify")] == [
        ("fine", "lower.xlsx row 4")]
    (tmp_path / "broken.xlsx").write_text("a,b\n1,2\n")
    with pytest.raises(LorakitError, match="broken.xlsx is not an Excel workbook"):
        read_records(tmp_path / "broken.xlsx", "classify")
