"""Black-box attacks on text classifiers, sent through the guard like a real attacker would.

- ``word_substitution``: greedy word substitution in the TextFooler family (Jin et al., AAAI 2020): rank
  words by how much deleting each lowers the true class's probability, then replace the most important
  words, one at a time, by the candidate from the attacker's vocabulary that lowers it most, until the label
  flips. No synonym embeddings here (no download): candidates are words of the attacker's own corpus.
- ``char_swap``: the DeepWordBug family (Gao et al., 2018): the same ranking, then character edits inside
  the important words (swap two neighbours, drop one, insert one, replace one by a keyboard neighbour).
- ``text_extraction``: query natural texts of another distribution, train a TF-IDF + logistic regression
  thief on the answers, report its agreement with the victim.

Each sends one text per request, many near-identical texts in a row: what the session trackers look for.
A refused query gives the attacker nothing; when every key is refused the attack stops (``stopped``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from ._client import REFUSED, AttackBlocked
from ._result import AttackResult
from ._text_client import TextClient

__all__ = ["char_swap", "text_extraction", "word_substitution"]

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_KEYBOARD = {c: n for row in _ROWS for c, n in zip(row, row[1:] + row[-2], strict=True)}
Candidates = Callable[[str, random.Random], list[str]]


class _Probe:
    """Queries one text at a time and remembers what the attack spent."""

    def __init__(self, client: TextClient, budget: int) -> None:
        self.client = client
        self.budget = budget
        self.used = 0

    def __call__(self, text: str) -> tuple[int, np.ndarray | None]:
        if self.used >= self.budget:
            raise _OutOfBudget
        self.used += 1
        ans = self.client.predict_texts([text])
        return int(ans.labels[0]), None if ans.probabilities is None else ans.probabilities[0]


class _OutOfBudget(Exception):
    pass


def _greedy(client: TextClient, text: str, candidates: Candidates, *, budget: int, max_words: int,
            seed: int) -> tuple[bool, str, int]:
    """The shared loop: (success, final text, queries used)."""
    probe, rng = _Probe(client, budget), random.Random(seed)
    label, proba = probe(text)
    if label == REFUSED or proba is None:
        return False, text, probe.used
    words = text.split(" ")
    base = float(proba[label])
    try:
        importance = []
        for i in range(min(len(words), max_words)):
            lab, p = probe(" ".join(words[:i] + words[i + 1:]))
            importance.append(-1.0 if p is None else base - float(p[label]) + (lab not in (label, REFUSED)))
        current = base
        for i in np.argsort(importance)[::-1]:
            best: tuple[float, str] | None = None
            for cand in candidates(words[i], rng):
                trial = [*words[:i], cand, *words[i + 1:]]
                lab, p = probe(" ".join(trial))
                if p is None:
                    continue
                if lab != label:
                    return True, " ".join(trial), probe.used
                if float(p[label]) < current and (best is None or float(p[label]) < best[0]):
                    best = (float(p[label]), cand)
            if best is not None:
                current, words[i] = best[0], best[1]
    except _OutOfBudget:
        pass
    return False, " ".join(words), probe.used


def _run(name: str, client: TextClient, texts: Sequence[str], candidates: Candidates, *, budget: int,
         max_words: int, seed: int) -> AttackResult:
    successes, tried, stopped = 0, 0, False
    try:
        for k, text in enumerate(texts):
            ok, _, _ = _greedy(client, text, candidates, budget=budget, max_words=max_words, seed=seed + k)
            successes += ok
            tried += 1
    except AttackBlocked:
        stopped = True
    return AttackResult(name=name, run_id=client.run_id, keys=len(client.keys), sent=client.sent,
                        answered=client.answered, stopped=stopped, success=successes > 0,
                        detail={"texts": float(len(texts)), "tried": float(tried), "evaded": float(successes),
                                "success_rate": successes / max(1, len(texts))})


def word_substitution(client: TextClient, texts: Sequence[str], vocabulary: Sequence[str], *,
                      budget: int = 300, candidates: int = 8, max_words: int = 40, seed: int = 0) -> AttackResult:
    """Greedy word substitution against each text (at most ``budget`` queries per text)."""
    vocab = [w for w in dict.fromkeys(vocabulary) if w.isalpha()]
    if not vocab:
        raise ValueError("the vocabulary has no words")

    def pick(word: str, rng: random.Random) -> list[str]:
        return [w for w in rng.sample(vocab, min(len(vocab), candidates + 1)) if w != word][:candidates]

    return _run("text-word-substitution", client, texts, pick, budget=budget, max_words=max_words, seed=seed)


def _char_edits(word: str, rng: random.Random) -> list[str]:
    if len(word) < 2:
        return []
    i = rng.randrange(len(word) - 1)
    j = rng.randrange(len(word))
    ch = word[j].lower()
    near = _KEYBOARD.get(ch, ch)
    return list(dict.fromkeys([
        word[:i] + word[i + 1] + word[i] + word[i + 2:],  # swap neighbours
        word[:j] + word[j + 1:],  # drop one
        word[:j] + near + word[j + 1:],  # keyboard neighbour
        word[:j] + word[j] + word[j:],  # double one
    ]))


def char_swap(client: TextClient, texts: Sequence[str], *, budget: int = 300, max_words: int = 40,
              seed: int = 0) -> AttackResult:
    """Character-level edits inside the most important words of each text."""
    return _run("text-char-swap", client, texts, _char_edits, budget=budget, max_words=max_words, seed=seed)


def text_extraction(client: TextClient, queries: Sequence[str], eval_texts: Sequence[str],
                    eval_labels: np.ndarray, *, batch: int = 1) -> AttackResult:
    """Label ``queries`` through the guard, train a thief, measure its agreement with the victim's labels."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    stopped = False
    got_texts: list[str] = []
    got_labels: list[int] = []
    try:
        for start in range(0, len(queries), batch):
            chunk = list(queries[start : start + batch])
            ans = client.predict_texts(chunk)
            for text, lab in zip(chunk, ans.labels, strict=True):
                if lab != REFUSED:
                    got_texts.append(text)
                    got_labels.append(int(lab))
    except AttackBlocked:
        stopped = True
    agreement = 0.0
    if len(set(got_labels)) >= 2:
        thief = make_pipeline(TfidfVectorizer(sublinear_tf=True), LogisticRegression(max_iter=2000))
        thief.fit(got_texts, got_labels)
        agreement = float(np.mean(thief.predict(list(eval_texts)) == np.asarray(eval_labels)))
    return AttackResult(name="text-extraction", run_id=client.run_id, keys=len(client.keys), sent=client.sent,
                        answered=client.answered, stopped=stopped, success=agreement >= 0.5,
                        detail={"labelled": float(len(got_labels)), "agreement": agreement})
