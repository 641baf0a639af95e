"""`lorakit predict`: classify texts with trained adapters."""

from __future__ import annotations


SHOWN_LABELS = 5  # with more classes, the likeliest this many are printed


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify texts with a trained classification adapter",
        description="Print the predicted label and the probability of every label (of the likeliest five, "
                    "where there are more) for each text.",
    )
    parser.add_argument("texts", nargs="+", metavar="TEXT",
                        help="texts to classify; '-' reads one text a line from standard input; for an adapter "
                             "trained on pairs of texts, each TEXT is 'first<TAB>second' ($'a\\tb' in bash)")
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR",
                        help="a classification run folder of lorakit train (--out), or the adapter (or full model) "
                             "folder in it; repeat to compare")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first")
    parser.add_argument("--model", default=None, help="base model: 'default' or a folder (default: the adapter's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.distributed import pick_device
    from lorakit.inference import load_trained, predict

    texts = _texts(args.texts)
    trained = load_trained(args.adapter, merge=args.merge, model=args.model, device=pick_device(args.device))
    results = predict(trained, texts)
    for name, rows in results.items():
        if len(results) > 1:
            print(f"[{name}]")
        for row in rows:
            ranked, classes = row["probabilities"].items(), len(row["probabilities"])
            if classes > SHOWN_LABELS:  # the likeliest few, not a line of every class
                ranked = sorted(ranked, key=lambda item: -item[1])[:SHOWN_LABELS]
            probabilities = "  ".join(f"{label} {p:.3f}" for label, p in ranked)
            more = f"; top {SHOWN_LABELS} of {classes}" if classes > SHOWN_LABELS else ""
            print(f"{row['label']:<10} ({probabilities}{more})  {row['text']}")
    return 0


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
