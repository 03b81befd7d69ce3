"""Text corpora that ship in a Debian package: the ``fortunes`` collections (``apt-get install fortunes
fortunes-bofh-excuses``), read from ``/usr/share/games/fortunes``. No download at run time.

A text classifier learns which collection a fortune comes from (e.g. computers / politics / science / work);
another collection (``bofh-excuses``, ``food``, ...) is the natural data of another distribution that an
extraction attack queries with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["FORTUNES", "TEXT_CLASSES", "fortune_texts", "labelled_fortunes", "text_classifier"]

FORTUNES = Path("/usr/share/games/fortunes")
TEXT_CLASSES: tuple[str, ...] = ("computers", "politics", "science", "work")
_SPACE = re.compile(r"\s+")


def fortune_texts(collection: str, *, root: Path = FORTUNES, max_chars: int = 600) -> list[str]:
    """The fortunes of one collection, whitespace collapsed, those longer than ``max_chars`` left out;
    FileNotFoundError (naming the Debian package) when the collection is not installed."""
    path = root / collection
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install the Debian package fortunes (and fortunes-bofh-excuses)")
    raw = path.read_text(encoding="utf-8", errors="replace")
    texts = (_SPACE.sub(" ", chunk).strip() for chunk in raw.split("\n%\n"))
    return [t for t in texts if 10 <= len(t) <= max_chars]


def labelled_fortunes(classes: tuple[str, ...] = TEXT_CLASSES, *, root: Path = FORTUNES,
                      max_chars: int = 600) -> tuple[list[str], list[int]]:
    """Texts of several collections and the index of each one's collection."""
    texts: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        chunk = fortune_texts(name, root=root, max_chars=max_chars)
        texts += chunk
        labels += [k] * len(chunk)
    return texts, labels


def text_classifier(texts: list[str], labels: list[int]) -> Any:
    """The victim model of the text tests, demo and benchmark: TF-IDF + logistic regression (scikit-learn)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(sublinear_tf=True), LogisticRegression(max_iter=3000, C=10.0)).fit(
        texts, labels)
