"""Text features: projection, calibration on held-out texts, the cheap checks, persistence without pickles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectors import Profile, load_profile
from detectors.text import CHECK_NAMES, TextChecks, TextModel, TextProjection, text_statistics
from tests.text.conftest import TextData


class TestHashing:
    def test_equals_hashing_vectorizer(self, fortunes: TextData) -> None:
        """The lean hasher gives scikit-learn's HashingVectorizer output (halves weighted to unit norm)."""
        import scipy.sparse as sp

        from detectors.text import hashed
        from detectors.text._hashing import CHARS, WORDS

        texts = [*fortunes.test[:100], "", "a", "!!", "naïve café\u200b", "x" * 3000]
        words, chars = WORDS.transform(texts), CHARS.transform(texts)
        w_only, c_only = np.diff(chars.indptr) == 0, np.diff(words.indptr) == 0
        expected = sp.hstack([sp.diags(np.where(w_only, 1.0, 2**-0.5)) @ words,
                              sp.diags(np.where(c_only, 1.0, 2**-0.5)) @ chars]).tocsr()
        got = hashed(texts)
        assert got.shape == expected.shape
        assert abs(got - expected).max() < 1e-6


class TestProjection:
    def test_near_duplicates_land_close(self, fortunes: TextData) -> None:
        """One swapped word moves a text far less than replacing it with another text (trackers rely on it)."""
        proj = TextProjection.random()
        a, b = fortunes.test[0], fortunes.test[1]
        words = a.split()
        words[len(words) // 2] = "zebra"
        F = proj.transform([a, " ".join(words), b])
        assert np.linalg.norm(F[0] - F[1]) < 0.5 * np.linalg.norm(F[0] - F[2])

    def test_unseen_shares(self) -> None:
        """Texts made only of reference n-grams have no unseen share; gibberish is all unseen."""
        ref = [f"the cat sat on the mat number {w}" for w in ("one", "two", "three", "four")] * 20
        proj = TextProjection(n_components=3).fit(ref)
        F = proj.transform(["the cat sat on the mat", "qzxv wprk"])
        assert F.shape == (2, 6)
        assert F[0, -2:].tolist() == [0.0, 0.0]
        assert F[1, -2:].tolist() == [1.0, 1.0]

    def test_hashed_path_equals_sparse_product(self, fortunes: TextData) -> None:
        """transform_hashed equals the plain sparse product with the stored components."""
        from detectors.text import hashed

        proj = TextProjection(n_components=8).fit(fortunes.train[:400])
        H = hashed(fortunes.test[:20])
        weights, _ = proj._full()
        assert np.allclose(proj.transform_hashed(H)[:, :8], (H @ weights), atol=1e-5)

    def test_parts_round_trip(self) -> None:
        """to_parts / from_parts rebuild the same projection from plain arrays."""
        ref = [f"text number {i} about topic {i % 7}" for i in range(80)]
        proj = TextProjection(n_components=4).fit(ref)
        again = TextProjection.from_parts(*proj.to_parts())
        assert np.array_equal(proj.transform(ref[:5]), again.transform(ref[:5]))


class TestChecks:
    @pytest.mark.parametrize(
        ("text", "column"),
        [
            ("pay\u200bpal", 0),  # zero-width space
            ("evil\u202etxt.exe", 0),  # right-to-left override
            ("bell\x07", 1),
            ("private\ue000", 1),
            ("p\u0430ypal", 2),  # Cyrillic a inside a Latin word
            ("\uff50\uff41\uff59", 2),  # full-width letters
        ],
    )
    def test_statistics(self, text: str, column: int) -> None:
        """Each trick counts in its own statistic, and only there."""
        stats = text_statistics([text])[0, :3]
        assert stats[column] >= 1
        assert stats[[j for j in range(3) if j != column]].sum() == 0

    def test_clean_text_scores_zero(self) -> None:
        """Plain text, tabs, newlines and non-Latin scripts used alone score 0 on every count check."""
        texts = ["hello world\tand\nmore", "Привет мир", "こんにちは世界", "naïve café"]
        for name, values in TextChecks().score(texts).items():
            assert values.tolist() == [0.0] * 4, name

    def test_calibrated_on_reference(self, fortunes: TextData, text_profile: Profile) -> None:
        """Fitted checks fire on at most about 1 % of held-out texts at 0.99, and on the tricks."""
        model = TextModel.from_profile(text_profile)
        assert model is not None
        benign = model.checks.score(fortunes.test)
        for name in CHECK_NAMES:
            assert (benign[name] > 0.99).mean() <= 0.02, name
        tricked = model.checks.score([t.replace(" ", "\u200b ", 1) for t in fortunes.test[:50]])
        assert (tricked["text.invisible"] > 0.99).all()
        long = model.checks.score([" ".join(fortunes.test[:40])])
        assert long["text.length"][0] > 0.999


    def test_class_absent_from_a_small_reference_reaches_the_policy_threshold(self) -> None:
        """On 200 clean reference texts, one zero-width character scores 1.0 (the default rule fires at 0.999;
        a conformal p-value alone gives at most 200/201), and a clean text still scores 0."""
        reference = [f"ticket {i}: my order {i % 7} has not arrived" for i in range(200)]
        checks = TextChecks().fit(reference)
        scores = checks.score(["my order\u200b has not arrived", "my order has not arrived"])
        assert scores["text.invisible"].tolist() == [1.0, 0.0]


class TestTextProfile:
    def test_held_out_calibration(self, fortunes: TextData, text_profile: Profile) -> None:
        """Held-out texts of the reference distribution pass ood.combined at 0.99 about 99 % of the time."""
        model = TextModel.from_profile(text_profile)
        assert model is not None
        scores = text_profile.score(model.features(fortunes.test))
        assert (scores["ood.combined"] > 0.99).mean() <= 0.02

    def test_saved_without_pickles(self, text_profile_dir: Path, text_profile: Profile) -> None:
        """The saved profile loads with allow_pickle=False and gives the same features and scores."""
        loaded = load_profile(text_profile_dir)
        model = TextModel.from_profile(loaded)
        assert model is not None
        texts = ["a computer program", "the senate voted"]
        original = TextModel.from_profile(text_profile)
        assert original is not None
        assert np.array_equal(model.features(texts), original.features(texts))
        for npz in text_profile_dir.glob("*.npz"):
            with np.load(npz, allow_pickle=False) as arrays:
                assert all(arrays[k].dtype != object for k in arrays.files)

    def test_fit_cli(self, fortunes: TextData, tmp_path: Path) -> None:
        """`guard-agent fit --text` fits a profile from a file of lines and refuses non-UTF-8 input clearly."""
        ref = tmp_path / "ref.txt"
        ref.write_text("\n".join(fortunes.train[:600]), encoding="utf-8")
        out = tmp_path / "profile"
        done = subprocess.run([sys.executable, "-m", "guard_agent.cli", "fit", "--text", "--data", str(ref),
                               "--out", str(out), "--components", "16"], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert "text profile: 600 reference texts, 16 components" in done.stdout
        assert load_profile(out).n_features == 19
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"caf\xe9\n" * 100)
        done = subprocess.run([sys.executable, "-m", "guard_agent.cli", "fit", "--text", "--data", str(bad),
                               "--out", str(tmp_path / "p2")], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 2
        assert "not UTF-8" in done.stderr and "Traceback" not in done.stderr
