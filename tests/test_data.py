"""lorakit.data: reading users' files (and every way they can be wrong), the embedded
datasets and their splits, tokenization with the loss mask, truncation, batching."""

import json
import warnings

import pytest
import torch

from lorakit import LorakitError
from lorakit.data import (
    DatasetSplits,
    chatterbot_pairs,
    collate,
    encode_classification,
    encode_language_modeling,
    read_records,
    rotten_tomatoes,
    split_records,
)
from lorakit.data.encode import IGNORE_INDEX
from lorakit.data.labels import LabelWarning
from lorakit.tasks import TruncationWarning, encode_splits, get_task
from tiny_training import char_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


# ---------------------------------------------------------------- reading files


def test_reads_classification_jsonl_and_csv(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": 0}])
    (tmp_path / "d.csv").write_text('text,label\ngood,pos\n"bad, really",neg\n\n')
    jsonl = read_records(tmp_path / "d.jsonl", "classify")
    csv = read_records(tmp_path / "d.csv", "classify")
    assert [(r["text"], r["label"]) for r in jsonl] == [("good", "pos"), ("bad", "0")]
    assert [(r["text"], r["label"]) for r in csv] == [("good", "pos"), ("bad, really", "neg")]
    assert csv[1]["_where"] == "d.csv line 3"


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl", "classify")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LorakitError, match="holds no records"):
        read_records(tmp_path / "empty.jsonl", "classify")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(LorakitError, match="holds no records"):
        read_records(tmp_path / "header.csv", "classify")
    (tmp_path / "d.xls").write_text("x")  # the old Excel format: save it as .xlsx or .csv
    with pytest.raises(LorakitError, match="suffix '.xls'"):
        read_records(tmp_path / "d.xls", "classify")


def test_a_line_that_does_not_parse_gives_its_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    with pytest.raises(LorakitError, match="d.jsonl line 3 is not valid JSON"):
        read_records(path, "classify")
    path.write_text('["text", "label"]\n')
    with pytest.raises(LorakitError, match="line 1 holds a JSON array"):
        read_records(path, "classify")


def test_missing_keys_list_the_keys_found(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"sentence": "b", "label": "y"}])
    with pytest.raises(LorakitError) as err:
        read_records(tmp_path / "d.jsonl", "classify")
    assert "line 2 lacks 'text'" in str(err.value) and "['label', 'sentence']" in str(err.value)
    (tmp_path / "d.csv").write_text("review,stars\nfine,5\n")
    with pytest.raises(LorakitError, match=r"lacks 'text', 'label'; it has keys \['review', 'stars'\]"):
        read_records(tmp_path / "d.csv", "classify")


def test_language_model_shapes_and_their_errors(tmp_path):
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1?", "completion": " 2"}])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    assert read_records(tmp_path / "pc.jsonl", "lm")[0]["completion"] == " 2"
    assert read_records(tmp_path / "t.jsonl", "lm")[0]["text"] == "plain words"
    write_jsonl(tmp_path / "labelled.jsonl", [{"text": "fine", "Label": "pos"}, {"text": "bad", "Label": "neg"}])
    with pytest.warns(UserWarning, match=r"line 1: the column 'Label' is not read;.*train --task classify") as caught:
        assert [r["text"] for r in read_records(tmp_path / "labelled.jsonl", "lm")] == ["fine", "bad"]
    assert len(caught) == 1  # once for the file, not per line
    write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "c"}])
    with pytest.raises(LorakitError, match="line 2 lacks 'prompt', 'completion'.*first line uses prompt"):
        read_records(tmp_path / "mixed.jsonl", "lm")
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "a"}])
    with pytest.raises(LorakitError, match=r"has keys \['question'\]"):
        read_records(tmp_path / "odd.jsonl", "lm")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(LorakitError, match="no assistant turn"):
        read_records(tmp_path / "chat.jsonl", "lm")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(LorakitError, match=r"messages\[0\]"):
        read_records(tmp_path / "chat.jsonl", "lm")


def test_alpaca_records_read_as_a_prompt_and_a_completion(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add 2 and 3", "input": "", "output": "5"},
                                {"instruction": "Translate", "input": "chat", "output": "cat"}]))
    first, second = read_records(path, "lm")
    assert (first["prompt"], first["completion"]) == ("Add 2 and 3\n", "5")
    assert (second["prompt"], second["completion"]) == ("Translate\n\nchat\n", "cat")
    path.write_text(json.dumps([{"instruction": "Add", "output": "5"}, {"instruction": "Add", "input": 3, "output": "5"}]))
    with pytest.raises(LorakitError, match="item 2: 'input' must be a string, got 3"):
        read_records(path, "lm")
    path.write_text(json.dumps([{"instruction": "Add", "output": "5"}, {"instruction": "Add", "output": " "}]))
    with pytest.raises(LorakitError, match="item 2: 'output' must be a non-empty string"):
        read_records(path, "lm")


def test_unknown_label_names_its_line_and_the_known_labels(tok):
    records = [{"text": "x", "label": "neutral", "_where": "val.jsonl line 4"}]
    with pytest.raises(LorakitError, match=r"val.jsonl line 4 has label 'neutral'.*known labels: \['neg', 'pos'\]"):
        encode_classification(records, tok, 16, {"neg": 0, "pos": 1})


def test_a_validation_label_unseen_in_training_stops_before_training(tok):
    splits = DatasetSplits(
        train=[{"text": "a", "label": "pos", "_where": "t 1"}, {"text": "b", "label": "neg", "_where": "t 2"}],
        validation=[{"text": "c", "label": "meh", "_where": "v 1"}], test=[], source="s")
    with pytest.raises(LorakitError, match="v 1 has label 'meh'"):
        encode_splits(get_task("classify"), splits, tok, 16)


# ---------------------------------------------------------------- the embedded datasets


def test_rotten_tomatoes_split_is_fixed_disjoint_and_without_plot_rows():
    splits = rotten_tomatoes()
    assert splits.sizes() == {"train": 10752, "validation": 1000, "test": 1000}
    texts = [{r["text"] for r in part} for part in (splits.train, splits.validation, splits.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert {r["label"] for r in splits.train} == {"fresh", "rotten"}
    assert [r["text"] for r in rotten_tomatoes().validation[:5]] == [r["text"] for r in splits.validation[:5]]
    small = rotten_tomatoes(limit=200)
    assert small.sizes() == {"train": 160, "validation": 20, "test": 20}


def test_chatterbot_pairs_leave_out_tech_support_and_coding_and_split_by_question():
    splits = chatterbot_pairs()
    every = splits.train + splits.validation + splits.test
    assert len(every) > 1000
    assert not {r["_where"] for r in every} & {"tech_support.yml", "coding.yml"}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in every)
    train_questions = {r["question"] for r in splits.train}
    assert not train_questions & {r["question"] for r in splits.validation + splits.test}
    # trivia.yml holds one entry that is a bare string, not a list of turns: it is no conversation
    # (iterated, its characters became 80 pairs such as "w" -> "o", the whole first batch of a chat run)
    assert not [r for r in every if len(r["messages"][0]["content"]) == 1 and len(r["messages"][1]["content"]) == 1]
    assert len(every) == 1072


def test_split_records_counts_and_fractions():
    records = [{"i": i} for i in range(100)]
    splits = split_records(records, 0.1, 5, source="s")
    assert splits.sizes() == {"train": 85, "validation": 10, "test": 5}
    assert sorted(r["i"] for r in splits.train + splits.validation + splits.test) == list(range(100))
    with pytest.raises(LorakitError, match="too few"):
        split_records(records[:3], 2, 1, source="s")


# ---------------------------------------------------------------- tokens and the loss mask


def test_prompt_tokens_are_masked_and_the_completion_ends_with_eos(tok):
    records = [{"prompt": "Q: hi", "completion": " ok", "_where": "x"}]
    example = encode_language_modeling(records, tok, 64).examples[0]
    assert len(example.input_ids) == len("Q: hi") + len(" ok") + 1
    assert example.label[:5] == [IGNORE_INDEX] * 5
    assert tok.decode(example.label[5:]) == " ok</s>"
    assert example.target_count() == 4


def test_chat_trains_only_the_assistant_turns(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    example = encode_language_modeling([{"messages": messages, "_where": "x"}], tok, 128).examples[0]
    assert tok.decode(example.input_ids) == "<user>hi</s><assistant>yo</s><user>bye</s><assistant>ciao</s>"
    trained = [t for t in example.label if t != IGNORE_INDEX]
    assert tok.decode(trained) == "yo</s>ciao</s>"


def test_an_assistant_turn_of_weight_0_is_in_the_prompt_but_not_trained(tok, tmp_path):
    """OpenAI's chat fine-tuning format: ``"weight": 0`` on an assistant message leaves it untrained."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao", "weight": 1}]
    (tmp_path / "w.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    records = read_records(tmp_path / "w.jsonl", "lm")
    example = encode_language_modeling(records, tok, 128).examples[0]
    assert tok.decode(example.input_ids) == "<user>hi</s><assistant>yo</s><user>bye</s><assistant>ciao</s>"
    assert tok.decode([t for t in example.label if t != IGNORE_INDEX]) == "ciao</s>"
    for bad, message in (({"role": "user", "content": "x", "weight": 0}, "weight 0"),
                         ({"role": "assistant", "content": "x", "weight": 0.5}, "weight 0.5")):
        (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [bad, messages[3]]}) + "\n")
        with pytest.raises(LorakitError, match=f"messages\\[0\\] has {message}; a weight is 0"):
            read_records(tmp_path / "b.jsonl", "lm")
    (tmp_path / "n.jsonl").write_text(json.dumps({"messages": messages[:2]}) + "\n")
    with pytest.raises(LorakitError, match="no assistant turn to train on"):
        read_records(tmp_path / "n.jsonl", "lm")


def test_plain_text_trains_every_token(tok):
    example = encode_language_modeling([{"text": "abc", "_where": "x"}], tok, 64).examples[0]
    assert example.label == example.input_ids == tok("abc")["input_ids"] + [tok.eos_token_id]


def test_over_long_examples_are_truncated_and_counted_in_one_warning(tok):
    splits = DatasetSplits(
        train=[{"text": "x" * n, "_where": "t"} for n in (5, 30, 40)],
        validation=[{"text": "y" * 50, "_where": "v"}], test=[{"text": "z", "_where": "e"}], source="s")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = encode_splits(get_task("text"), splits, tok, max_length=20)
    truncation = [w for w in caught if issubclass(w.category, TruncationWarning)]
    assert len(truncation) == 1
    assert "3 of 5 examples were longer than max_length=20" in str(truncation[0].message)
    assert "longest: 51 tokens" in str(truncation[0].message)
    assert max(len(e.input_ids) for e in data.train + data.validation) == 20


def test_a_prompt_longer_than_max_length_drops_the_example(tok):
    records = [{"prompt": "p" * 30, "completion": "c", "_where": "x"}, {"prompt": "p", "completion": "c", "_where": "y"}]
    encoded = encode_language_modeling(records, tok, 10)
    assert (encoded.truncated, encoded.dropped, len(encoded.examples)) == (1, 1, 1)


def test_collate_pads_on_the_right(tok):
    records = [{"prompt": "ab", "completion": "c", "_where": "x"}, {"prompt": "", "completion": "defg", "_where": "y"}]
    examples = encode_language_modeling(records, tok, 64).examples
    batch = collate(examples, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist()[:2] == [IGNORE_INDEX] * 2 and batch["labels"][0, 4] == IGNORE_INDEX
    classes = collate(encode_classification([{"text": "a b", "label": "p", "_where": "z"}], tok, 8, {"p": 1}).examples,
                      pad_id=0)
    assert classes["labels"].tolist() == [1] and classes["labels"].dtype == torch.long


# ---------------------------------------------------------------- what careless files get


def test_a_broken_jsonl_line_names_the_column_of_the_break(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "good", "label": 1\n')
    with pytest.raises(LorakitError, match=r"d.jsonl line 2 is not valid JSON \(Expecting ',' delimiter at the end "
                                           r"of the line\)"):
        read_records(path, "classify")
    path.write_text('{"text": "good" "label": 1}\r\n')
    with pytest.raises(LorakitError, match=r"line 1 is not valid JSON \(Expecting ',' delimiter at column 17\)"):
        read_records(path, "classify")


def test_a_file_that_is_not_utf8_is_refused_naming_the_line_and_the_expected_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine film,pos\nun film trop lent,neg\nun caf\u00e9 triste,neg\n".encode("latin-1"))
    with pytest.raises(LorakitError, match=r"latin.csv is not UTF-8 text: line 4 holds the byte 0xe9, which is not "
                                           r"UTF-8 .*lorakit reads UTF-8: save it as UTF-8"):
        read_records(path, "classify")
    path.write_bytes('{"text": "caf\u00e9", "label": "a"}\n'.encode("latin-1"))
    with pytest.raises(LorakitError, match="is not UTF-8 text: line 1"):
        read_records(path.rename(tmp_path / "latin.jsonl"), "classify")


def test_a_byte_order_mark_is_skipped(tmp_path):
    (tmp_path / "bom.csv").write_bytes("text,label\ngood,pos\n".encode("utf-8-sig"))
    assert read_records(tmp_path / "bom.csv", "classify")[0]["label"] == "pos"


def test_training_data_of_a_single_class_is_refused(tok):
    splits = DatasetSplits(train=[{"text": "a", "label": "pos", "_where": "t 1"},
                                  {"text": "b", "label": "pos", "_where": "t 2"}], validation=[], test=[], source="d.csv")
    with pytest.raises(LorakitError, match="the training split of d.csv has only the label 'pos'; a classifier needs "
                                           "examples of at least two classes"):
        encode_splits(get_task("classify"), splits, tok, 16)


def test_a_class_with_too_few_training_examples_is_named_in_a_warning():
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg", "_where": f"d {i}"} for i in range(20)]
    rows += [{"text": "odd", "label": "rare", "_where": "d 21"}, {"text": "odder", "label": "rarer", "_where": "d 22"},
             {"text": "odder still", "label": "rarer", "_where": "d 23"}]
    with pytest.warns(LabelWarning) as caught:
        labels = get_task("classify").labels(rows, "d.csv")
    assert labels == ["neg", "pos", "rare", "rarer"]
    assert [str(w.message) for w in caught] == [
        "d.csv: 2 class(es) with fewer than 5 training examples, too few to learn or to score: 'rare' (1), "
        "'rarer' (2); add examples of them, or leave them out"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # five examples of each class: no warning
        get_task("classify").labels(rows[:10], "d.csv")


def test_a_number_label_of_another_split_finds_its_class(tok):
    splits = DatasetSplits(train=[{"text": "a", "label": "0", "_where": "t 1"}, {"text": "b", "label": "1", "_where": "t 2"}],
                           validation=[{"text": "c", "label": "1.0", "_where": "v 1"}], test=[], source="s")
    data = encode_splits(get_task("classify"), splits, tok, 16)
    assert data.labels == ["0", "1"] and data.validation[0].label == 1


def test_a_label_column_with_a_value_per_line_is_refused_as_the_wrong_column(tmp_path):
    rows = [{"text": f"text {i}", "label": f"id-{i}"} for i in range(120)]
    splits = DatasetSplits(train=[{**r, "_where": f"d line {i}"} for i, r in enumerate(rows)], validation=[],
                           test=[], source="d.csv")
    with pytest.raises(LorakitError, match="holds 120 different values among 120 training records.*right column"):
        get_task("classify").labels(splits.train, splits.source)


def test_scores_that_pass_as_classes_are_named_as_scores():
    """A similarity file (0.0-5.0 in steps of 0.2: 26 values among many examples) is not refused as too many
    classes, so a warning says that numbers with fractions are more likely scores to fit."""
    from lorakit.data.labels import LabelWarning

    rows = [{"text": f"text {i}", "label": f"{(i % 26) / 5:.1f}", "_where": f"d line {i}"} for i in range(520)]
    with pytest.warns(LabelWarning, match=r"the 26 classes are numbers \(e\.g\. '0\.0', '5\.0'\); if they are scores"):
        get_task("classify").labels(rows, "sts.csv")
    stars = [{"text": f"text {i}", "label": str(1 + i % 5), "_where": f"d line {i}"} for i in range(100)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1-5 stars are classes: nothing to say
        get_task("classify").labels(stars, "stars.csv")


def test_a_label_column_of_many_numbers_is_refused_naming_regression():
    rows = [{"text": f"text {i}", "label": f"{i / 40:.2f}", "_where": f"d line {i}"} for i in range(120)]
    with pytest.raises(LorakitError, match=r"right column.*if they are scores \(a similarity, a rating\) to fit "
                                            r"as numbers, train --task regress"):
        get_task("classify").labels(rows, "sts.csv")
    words = [{"text": f"text {i}", "label": f"id-{i}", "_where": f"d line {i}"} for i in range(120)]
    with pytest.raises(LorakitError, match=r"names another\)$"):  # not numbers: no word of regression
        get_task("classify").labels(words, "d.csv")
