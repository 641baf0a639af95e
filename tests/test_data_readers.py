"""lorakit.data.readers: records a task needs, columns named otherwise (--text-column ...), missing values."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorakit import LorakitError
from lorakit.data import read_records
from lorakit.tasks import get_task, read_splits


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


# ---------------------------------------------------------------- what a careless user's files hold


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


def test_columns_named_in_another_case_are_read_and_a_lone_other_column_is_suggested(tmp_path):
    (tmp_path / "d.csv").write_text("Text,LABEL\ngreat film,pos\ndull,neg\n")
    assert [(r["text"], r["label"]) for r in read_records(tmp_path / "d.csv", "classify")] == [
        ("great film", "pos"), ("dull", "neg")]
    rows = "".join(f'{{"Text": "t{i}", "Label": "{"ab"[i % 2]}"}}\n' for i in range(20))
    (tmp_path / "s.jsonl").write_text(rows)
    stream = get_task("classify").stream_records(tmp_path / "s.jsonl", None, 8, None)
    assert set(stream.label_counts) == {"a", "b"}
    (tmp_path / "p.jsonl").write_text('{"Prompt": "2+2?", "Completion": " 4"}\n')
    assert read_records(tmp_path / "p.jsonl", "lm")[0]["completion"] == " 4"
    (tmp_path / "r.csv").write_text("review,label\ngreat film,1\n")
    with pytest.raises(LorakitError, match=r"r.csv line 2 lacks 'text'; it has keys \['label', 'review'\]; "
                                           r"give --text-column review if 'review' holds the text$"):
        read_records(tmp_path / "r.csv", "classify")


def test_pairs_of_texts_are_read_from_glue_columns_or_named_columns(tmp_path):
    """Entailment or paraphrase files: GLUE's pair columns need no flag; --text-column a,b names others."""
    glue = tmp_path / "rte.csv"
    glue.write_text("sentence1,sentence2,label\nA man sleeps.,Someone rests.,entailment\n"
                    "A dog runs.,A cat sits.,not_entailment\n")
    records = read_records(glue, "classify")
    assert [(r["text"], r["text_pair"], r["label"]) for r in records] == [
        ("A man sleeps.", "Someone rests.", "entailment"), ("A dog runs.", "A cat sits.", "not_entailment")]
    named = tmp_path / "pairs.jsonl"
    named.write_text('{"q": "Who?", "a": "Me.", "y": 1}\n{"q": "Why?", "a": "", "y": 0}\n')
    with pytest.raises(LorakitError, match=r"pairs.jsonl line 2: 'a' must be a non-empty string"):
        read_records(named, "classify", {"text": "q,a", "label": "y"})
    named.write_text('{"q": "Who?", "a": "Me.", "y": 1}\n{"q": "Why?", "y": 0}\n')
    with pytest.raises(LorakitError, match=r"line 2 lacks 'a' \(--text-column\)"):
        read_records(named, "classify", {"text": "q,a", "label": "y"})
    sst2 = tmp_path / "sst2.tsv"  # GLUE's single-sentence column is the text where there is no "text"
    sst2.write_text("sentence\tlabel\na gripping film\t1\nflat\t0\n")
    assert [(r["text"], r["label"]) for r in read_records(sst2, "classify")] == [("a gripping film", "1"), ("flat", "0")]
    qnli = tmp_path / "qnli.tsv"  # question and sentence: a pair, not the sentence alone
    qnli.write_text("question\tsentence\tlabel\nWho?\tHe did.\tentailment\nWhy?\tNo.\tnot_entailment\n")
    assert read_records(qnli, "classify")[0]["text_pair"] == "He did."
    plain = tmp_path / "plain.csv"  # a text column wins over pair columns beside it
    plain.write_text("text,premise,hypothesis,label\nok,x,y,1\nno,x,y,0\n")
    assert "text_pair" not in read_records(plain, "classify")[0]


def test_a_text_column_that_is_the_label_column_is_refused(tmp_path):
    """--text-column naming the label (alone or as a pair's second text) would let the model read the answer."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "pos", "y": "1"}\n{"text": "b", "label": "neg", "y": "0"}\n')
    for columns in ({"text": "text,label"}, {"text": "label"}, {"text": "text,y", "label": "y"}):
        with pytest.raises(LorakitError, match="is also the label column: the model would read the answer"):
            read_records(data, "classify", columns)
    with pytest.raises(LorakitError, match="names more than two columns"):
        read_records(data, "classify", {"text": "text,y,label"})
    assert read_records(data, "classify", {"text": "text,y"})[0]["text_pair"] == "1"
