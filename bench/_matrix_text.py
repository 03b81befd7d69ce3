"""The text row of the detection matrix: a TF-IDF + logistic regression classifier served by MLServer, the
guard in front with a text profile (``fit --text``) and the default policy.

Measured: benign sessions blocked (held-out fortunes, 10 % exact retries, 5 % one-word edits), the share of
attack queries the guard refused, attack success with and without the guard (greedy word substitution,
character edits), and the agreement of a thief trained through the guard with texts of another corpus
(bofh-excuses + food fortunes). Data: the Debian packages fortunes and fortunes-bofh-excuses.

    .venv/bin/python -m bench._matrix_text [--texts 20] [--benign 100] [--budget 300] [--keys 1]
    .venv/bin/python -m bench._matrix_text --cost     # CPU per text request, beside a numeric one

``text_row(...)`` returns the figures as a dict, for bench/detection_matrix.py to hook in.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench._servers import free_port
from bench.attacks import exe, process, write_policy
from guard_agent.attacks import (
    REFUSED,
    AttackResult,
    TextClient,
    char_swap,
    fortune_texts,
    labelled_fortunes,
    text_classifier,
    text_extraction,
    word_substitution,
)

MODEL = "fortunes"


@dataclass
class TextSetup:
    guard: str
    model: str
    clf: Any
    train: list[str]
    test: list[str]
    y_test: np.ndarray
    events: Path


def write_text_repo(root: Path, texts: list[str], labels: list[int], port: int) -> Any:
    """An MLServer repository serving a TfidfVectorizer + LogisticRegression pipeline (joblib: MLServer's
    own format; only the benchmark and the tests write it, the guard never loads it)."""
    import joblib

    model_dir = root / MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    clf = text_classifier(texts, labels)
    joblib.dump(clf, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"}}))
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 0, "debug": False}))
    return clf


def _wait(url: str, proc: Any, timeout: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(url)


@contextmanager
def text_setup(work: Path, *, policy: str = "default") -> Iterator[TextSetup]:
    """MLServer with the text model, and the guard (a subprocess) in front of it with a text profile."""
    from sklearn.model_selection import train_test_split

    from detectors import save_profile
    from detectors.text import fit_text_profile

    texts, labels = labelled_fortunes()
    train, test, y_train, y_test = train_test_split(texts, labels, test_size=0.3, random_state=0, stratify=labels)
    port, gport, aport = free_port(), free_port(), free_port()
    clf = write_text_repo(work / "repo", train, y_train, port)
    profile, _ = fit_text_profile(train, labels=np.asarray(y_train), seed=0)
    save_profile(profile, work / "profiles" / MODEL)
    write_policy(work / "policy.yaml", policy, keep_rate_limit=False)
    env = {**os.environ, "GUARD_LISTEN": f"127.0.0.1:{gport}", "GUARD_ADMIN_LISTEN": f"127.0.0.1:{aport}",
           "GUARD_UPSTREAM": f"http://127.0.0.1:{port}", "GUARD_PROFILE": str(work / "profiles"),
           "GUARD_POLICY": str(work / "policy.yaml"), "GUARD_HMAC_KEY": secrets.token_hex(16),
           "MLSERVER_LOGGING": "WARNING"}
    with ExitStack() as stack:
        ml = stack.enter_context(process([exe("mlserver"), "start", str(work / "repo")],
                                         stdout=work / "mlserver.log", env=env))
        _wait(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", ml)
        guard = stack.enter_context(process([exe("guard-agent"), "run"], stdout=work / "guard.log", env=env))
        _wait(f"http://127.0.0.1:{aport}/readyz", guard)
        yield TextSetup(f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{port}", clf, train, test,
                        np.asarray(y_test), work / "guard.log")


def benign_texts(pool: list[str], rng: random.Random, n: int) -> list[str]:
    """A benign session: held-out texts in random order, 10 % exact retries, 5 % with one word edited."""
    out: list[str] = []
    for _ in range(n):
        u = rng.random()
        if out and u < 0.10:
            out.append(rng.choice(out))
        elif out and u < 0.15:
            words = rng.choice(out).split(" ")
            words[rng.randrange(len(words))] = rng.choice(["the", "a", "really", "very", "now"])
            out.append(" ".join(words))
        else:
            out.append(rng.choice(pool))
    return out


def loopback(n: int) -> str:
    """Client n's own loopback address: the guard counts requests under unverified keys against the client
    address's session too, and real clients do not all share one address."""
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


def run_benign(setup: TextSetup, sessions: int) -> tuple[int, int, int]:
    """(sessions with any refused query, refused queries, queries) for benign sessions of 8..40 texts."""
    blocked_sessions = refused = total = 0
    for s in range(sessions):
        rng = random.Random(70_000 + s)
        client = TextClient(setup.guard, [f"benign-{s}-{secrets.token_hex(4)}"], f"benign{s}", model=MODEL,
                            refusals_to_retire=10**6, source_address=loopback(s))
        try:
            ans = client.predict_texts(benign_texts(setup.test, rng, rng.randint(8, 40)))
        finally:
            client.close()
        bad = int((ans.labels == REFUSED).sum())
        refused += bad
        total += ans.labels.size
        blocked_sessions += bad > 0
    return blocked_sessions, refused, total


def _attack(setup: TextSetup, url: str, name: str, targets: list[str], budget: int, keys: int) -> AttackResult:
    client = TextClient(url, [f"{name}-{i}-{secrets.token_hex(4)}" for i in range(keys)], f"{name}-{url[-5:]}",
                        model=MODEL, source_address=loopback(1000 + (name == "char")))
    try:
        if name == "word":
            vocab = " ".join(fortune_texts("food") + fortune_texts("love")).split()
            return word_substitution(client, targets, vocab, budget=budget)
        return char_swap(client, targets, budget=budget)
    finally:
        client.close()


def text_row(*, texts: int = 20, benign: int = 100, budget: int = 300, keys: int = 1) -> dict[str, Any]:
    """Every figure of the text row (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp, text_setup(Path(tmp)) as setup:
        row: dict[str, Any] = {}
        s_blocked, q_refused, q_total = run_benign(setup, benign)
        row["benign"] = {"sessions": benign, "sessions_blocked": s_blocked, "queries": q_total,
                         "queries_refused": q_refused}
        rng = random.Random(1)
        direct_labels = setup.clf.predict(setup.test)
        correct = [t for t, y, p in zip(setup.test, setup.y_test, direct_labels, strict=True) if y == p]
        targets = rng.sample(correct, texts)
        for name in ("word", "char"):
            base = _attack(setup, setup.model, name, targets, budget, keys)
            guarded = _attack(setup, setup.guard, name, targets, budget, keys)
            row[name] = {"success_without_guard": base.detail["success_rate"],
                         "success_with_guard": guarded.detail["success_rate"], "sent": guarded.sent,
                         "answered": guarded.answered,
                         "refused_share": 1.0 - guarded.answered / max(1, guarded.sent), "stopped": guarded.stopped}
        queries = fortune_texts("bofh-excuses") + fortune_texts("food") + fortune_texts("love")
        rng.shuffle(queries)
        for where, url in (("without_guard", setup.model), ("with_guard", setup.guard)):
            client = TextClient(url, [f"thief-{secrets.token_hex(4)}"], f"thief-{where}", model=MODEL,
                                source_address=loopback(1002))
            try:
                res = text_extraction(client, queries, setup.test, direct_labels)
            finally:
                client.close()
            row[f"extraction_{where}"] = {"agreement": res.detail["agreement"], "sent": res.sent,
                                          "answered": res.answered, "stopped": res.stopped}
        return row


def text_cost(repeats: int = 3) -> dict[str, float]:
    """CPU microseconds per request, side by side: a numeric v2 parse (64 FP64), a text v2 parse, and the guard's
    text path with a fitted profile (parse, projection of the hashed rows, detectors, checks)."""
    import orjson

    from detectors.text import TextModel, fit_text_profile
    from guard_agent.protocols import parse_request

    texts, _ = labelled_fortunes()
    profile, _ = fit_text_profile(texts[:1500], seed=0)
    model = TextModel.from_profile(profile)
    assert model is not None
    sample = texts[1500:1700]
    bodies = [orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [t],
                                        "parameters": {"content_type": "str"}}]}) for t in sample]
    numeric = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64",
                                        "data": np.random.default_rng(0).random(64).tolist()}]})

    def parse(body: bytes) -> Any:
        return parse_request("v2", body, content_type="application/json", content_encoding=None)

    def guard_path(body: bytes) -> None:
        parsed = parse(body)
        profile.score(model.projection.transform_hashed(parsed.hashed_texts))
        model.checks.score(parsed.texts)

    def cpu(fn: Any) -> float:
        started = time.process_time()
        for _ in range(repeats):
            for body in bodies:
                fn(body)
        return (time.process_time() - started) / (repeats * len(bodies)) * 1e6

    return {"mean_chars": float(np.mean([len(t) for t in sample])),
            "numeric_parse_us": cpu(lambda _: parse(numeric)), "text_parse_us": cpu(parse),
            "text_scored_us": cpu(guard_path)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=20, help="attacked texts per attack")
    ap.add_argument("--benign", type=int, default=100, help="benign sessions")
    ap.add_argument("--budget", type=int, default=300, help="queries per attacked text")
    ap.add_argument("--keys", type=int, default=1, help="API keys each attacker rotates through")
    ap.add_argument("--cost", action="store_true", help="only the CPU cost per text request (no servers)")
    args = ap.parse_args(argv)
    if args.cost:
        json.dump(text_cost(), sys.stdout, indent=2)
        print()
        return
    started = time.process_time()
    row = text_row(texts=args.texts, benign=args.benign, budget=args.budget, keys=args.keys)
    json.dump(row, sys.stdout, indent=2)
    print(f"\n(bench CPU {time.process_time() - started:.1f} s)")


if __name__ == "__main__":
    main()
