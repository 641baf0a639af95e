"""`lorakit predict`: classify texts, or the records of a file, with trained adapters."""

from __future__ import annotations

from lorakit.data.files import FORMATS

SHOWN_LABELS = 5  # with more classes, the likeliest this many are printed
OUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")  # what --out writes


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify texts (or score them: a regression adapter) with a trained adapter",
        description="Print the predicted label and the probability of every label (of the likeliest five, "
                    "where there are more) for each text (a regression adapter: the number), or with --data "
                    "every record of a file, and with --out write its rows with their predictions.",
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="texts to classify; '-' reads one text a line from standard input; for an adapter "
                             "trained on pairs of texts, each TEXT is 'first<TAB>second' ($'a\\tb' in bash)")
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR",
                        help="a classify or regress run folder of lorakit train (--out), or the adapter (or full "
                             "model) folder in it; repeat to compare")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help=f"a {FORMATS} file whose every record to classify (labelled or not; a .txt file: one "
                             "text a line), or a folder datasets saved (one split's)")
    parser.add_argument("--text-column", default=None, metavar="NAME",
                        help="the column of --data holding the text, when it is named otherwise than in training "
                             "('first,second' for a pair of texts)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="write --data's rows with a 'prediction' column and the probabilities, as a .csv, "
                             ".tsv, .jsonl or .parquet file (by its suffix; one --adapter)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="texts per forward pass (default: the classify task's evaluation batch)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first")
    parser.add_argument("--model", default=None, help="base model: 'default' or a folder (default: the adapter's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.distributed import pick_device
    from lorakit.inference import load_trained, predict

    _check(args)
    texts = None if args.data else _texts(args.texts)  # standard input read before the model loads
    trained = load_trained(args.adapter, merge=args.merge, model=args.model, device=pick_device(args.device))
    if args.data:
        records = _read(trained, args)
        texts = [[r["text"], r["text_pair"]] if "text_pair" in r else r["text"] for r in records]
    results = predict(trained, texts, args.batch_size, progress=True)
    if args.out:
        name, rows = next(iter(results.items()))
        path = _write(args.out, records, rows)
        print(f"{name}: {len(rows)} predictions of {args.data} written to {path}")
        return 0
    for name, rows in results.items():
        if len(results) > 1:
            print(f"[{name}]")
        for row in rows:
            text = "\t".join(row["text"]) if isinstance(row["text"], list) else row["text"]
            if "value" in row:  # a regression's number
                print(f"{row['value']:<10.4g}  {text}")
                continue
            ranked, classes = row["probabilities"].items(), len(row["probabilities"])
            if classes > SHOWN_LABELS:  # the likeliest few, not a line of every class
                ranked = sorted(ranked, key=lambda item: -item[1])[:SHOWN_LABELS]
            probabilities = "  ".join(f"{label} {p:.3f}" for label, p in ranked)
            more = f"; top {SHOWN_LABELS} of {classes}" if classes > SHOWN_LABELS else ""
            print(f"{row['label']:<10} ({probabilities}{more})  {text}")
    return 0


def _check(args) -> None:
    """Refuse, before a model loads, what cannot be done."""
    from pathlib import Path

    from lorakit.atomic import check_writable
    from lorakit.data.compressed import format_suffix
    from lorakit.data.files import SUFFIXES
    from lorakit.errors import LorakitError

    if args.batch_size is not None and args.batch_size < 1:
        raise LorakitError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.data is None:
        if args.out or args.text_column:
            raise LorakitError(f"{'--out' if args.out else '--text-column'} goes with --data FILE (the records to "
                               "classify); give --data, or TEXT arguments alone")
        if not args.texts:
            raise LorakitError("give texts to classify (TEXT ..., or '-' to read them from standard input) or "
                               "--data FILE")
        files = [t for t in args.texts if t != "-" and format_suffix(Path(t)) in SUFFIXES and Path(t).is_file()]
        if files:
            raise LorakitError(f"{files[0]!r} is a file; give --data {files[0]} to classify its records (TEXT "
                               "arguments are classified as they are)")
        return
    if args.texts:
        raise LorakitError("give TEXT arguments or --data FILE, not both")
    if args.out is None:
        return
    out = Path(args.out)
    if format_suffix(out) not in OUT_SUFFIXES or out.suffix != format_suffix(out):
        raise LorakitError(f"--out {args.out}: predictions are written as {', '.join(OUT_SUFFIXES)} (by the "
                           "suffix); name the file so")
    if len(args.adapter) > 1:
        raise LorakitError("--out writes one adapter's predictions; give one --adapter (or leave out --out to "
                           "compare several)")
    if out.exists() and out.resolve() == Path(args.data).resolve():
        raise LorakitError(f"--out {args.out} is the --data file itself; write the predictions elsewhere")
    if out.exists() and not args.overwrite:
        raise LorakitError(f"--out {args.out} exists; give another path, or --overwrite to replace it")
    check_writable(out.parent)


def _read(trained, args) -> list[dict]:
    """The records of ``--data``, their text read from the column the (first) adapter trained on unless
    ``--text-column`` names one (a .txt file: its lines)."""
    from pathlib import Path

    from lorakit.data.compressed import format_suffix
    from lorakit.data.readers import read_texts

    trained_on = (trained.info_of(trained.names[0]).get("columns") or {}).get("text")
    column = args.text_column or (trained_on if format_suffix(Path(args.data)) != ".txt" else None)
    return read_texts(args.data, {"text": column} if column else None)


def _write(out, records: list[dict], rows: list[dict]):
    """Write each record's row with ``prediction`` and its probabilities (atomically): a CSV, TSV or Parquet
    row gains ``prediction``, ``probability`` (of that label) and a ``p_<label>`` column per class; a JSONL
    line gains ``prediction`` and ``probabilities`` (``{label: p}``); a regression's row gains ``prediction``
    (the number) alone."""
    import csv
    import json
    from pathlib import Path

    from lorakit.atomic import writing

    out = Path(out)
    numbers = bool(rows) and "value" in rows[0]  # a regression: the number alone
    labels = list(rows[0]["probabilities"]) if rows and not numbers else []
    columns = list(dict.fromkeys(key for record in records for key in record["_row"]))
    added = ["prediction"] + ([] if numbers else ["probability", *(f"p_{label}" for label in labels)])
    fields = [c for c in columns if c not in added] + added

    def table_rows():
        for record, row in zip(records, rows):
            if numbers:
                yield {**record["_row"], "prediction": row["value"]}
                continue
            chances = row["probabilities"]
            yield {**record["_row"], "prediction": row["label"], "probability": chances[row["label"]],
                   **{f"p_{label}": chances[label] for label in labels}}

    if out.suffix == ".parquet":
        with writing(out) as tmp:
            _write_parquet(tmp, list(table_rows()), fields)
        return out
    with writing(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        if out.suffix == ".jsonl":
            for record, row in zip(records, rows):
                line = {**record["_row"], "prediction": row["value"]} if numbers else \
                    {**record["_row"], "prediction": row["label"], "probabilities": row["probabilities"]}
                handle.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
            return out
        writer = csv.DictWriter(handle, fieldnames=fields, delimiter="\t" if out.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(table_rows())
    return out


def _write_parquet(path, rows: list[dict], fields: list[str]) -> None:
    """``rows`` as a Parquet table of ``fields`` at ``path``; a column whose values pyarrow cannot give one
    type (a JSONL file's numbers and strings mixed) is written as text."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = []
    for field in fields:
        values = [row.get(field) for row in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str)
                                    for v in values], pa.string()))
    pq.write_table(pa.Table.from_arrays(arrays, names=fields), path)


def _texts(given: list[str]) -> list[str]:
    """The texts: as given, with '-' read from standard input one text a line (blank lines
    skipped); an empty text is refused."""
    import sys

    from lorakit.errors import LorakitError

    texts = []
    for text in given:
        if text == "-":
            texts.extend(line.rstrip("\r\n") for line in sys.stdin if line.strip())
        elif not text.strip():
            raise LorakitError("a text to classify is empty; give some words (or '-' to read texts from "
                               "standard input)")
        else:
            texts.append(text)
    if not texts:
        raise LorakitError("standard input held no text to classify; give one text a line")
    return texts
