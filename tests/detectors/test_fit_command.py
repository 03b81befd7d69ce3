"""`guard-agent fit` behaviour, called in-process through the CLI's entry point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors import load_profile
from guard_agent.cli import main


def fit(*argv: str) -> int:
    """``guard-agent fit ARGV``'s exit status."""
    return main(["fit", *argv])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "ref.npy"
    np.save(path, rng.normal(size=(400, 6)))
    return path


class TestRunFit:
    def test_fits_saves_and_prints_table(self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Exit 0, a loadable profile, and a table with every detector, threshold, FPR and timings."""
        out = tmp_path / "profile"
        assert fit("--data", str(data), "--out", str(out), "--fpr", "0.05") == 0
        text = capsys.readouterr().out
        for name in ("input.schema", "ood.mahalanobis", "ood.knn", "ood.pca", "ood.iforest", "ood.combined"):
            assert name in text
        assert "calib FPR" in text
        assert "score us/row" in text
        profile = load_profile(out)
        assert profile.revision in text
        assert profile.document["fpr"] == 0.05

    def test_refuses_overwrite_without_force(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A second fit into the same directory exits 2 with a --force hint and leaves the profile intact."""
        out = tmp_path / "profile"
        assert fit("--data", str(data), "--out", str(out)) == 0
        before = (out / "profile.json").read_bytes()
        capsys.readouterr()
        assert fit("--data", str(data), "--out", str(out), "--seed", "5") == 2
        err = capsys.readouterr().err
        assert "--force" in err
        assert "Traceback" not in err
        assert (out / "profile.json").read_bytes() == before
        assert fit("--data", str(data), "--out", str(out), "--seed", "5", "--force") == 0
        assert (out / "profile.json").read_bytes() != before

    def test_detector_subset_and_labels(self, data: Path, tmp_path: Path) -> None:
        """--detectors limits the set; --labels gives per-class statistics."""
        labels = tmp_path / "y.npy"
        np.save(labels, np.repeat([0, 1], 200))
        out = tmp_path / "p"
        argv = (
            "--data",
            str(data),
            "--out",
            str(out),
            "--detectors",
            "mahalanobis,knn",
            "--labels",
            str(labels),
        )
        assert fit(*argv) == 0
        profile = load_profile(out)
        assert set(profile.detectors) == {"ood.mahalanobis", "ood.knn"}
        assert profile.document["labels"]["counts"] == [200, 200]

    def test_csv_with_label_column(self, tmp_path: Path) -> None:
        """CSV input with a header and --label-column works end to end; feature names come from the header."""
        rng = np.random.default_rng(1)
        rows = ["a,b,y", *(f"{a:.4f},{b:.4f},{int(a > 0)}" for a, b in rng.normal(size=(100, 2)))]
        (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
        out = tmp_path / "p"
        assert fit("--data", str(tmp_path / "r.csv"), "--out", str(out), "--label-column", "y") == 0
        assert load_profile(out).feature_names == ("a", "b")

    @pytest.mark.parametrize(
        ("make", "extra", "message"),
        [
            (lambda p: np.save(p / "x.npy", np.zeros((3, 2))), (), "at least 10 rows"),
            (lambda p: np.save(p / "x.npy", np.arange(4.0)), (), "expected a 2-D array"),
            (lambda p: np.save(p / "x.npy", np.zeros((50, 2))), ("--detectors", "lof"), "unknown detector"),
            (lambda p: np.save(p / "x.npy", np.zeros((50, 2))), ("--fpr", "2"), "fpr must be in"),
            (lambda p: None, (), "not found"),
        ],
    )
    def test_bad_input_exits_2_with_message(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        make: object,
        extra: tuple[str, ...],
        message: str,
    ) -> None:
        """Bad data or options: exit 2, one clear line on stderr, no traceback, nothing written."""
        make(tmp_path)  # type: ignore[operator]
        out = tmp_path / "p"
        assert fit("--data", str(tmp_path / "x.npy"), "--out", str(out), *extra) == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.startswith("guard-agent fit: ") and err.count("\n") == 1
        assert not out.exists()

    def test_label_count_mismatch(self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Labels of the wrong length are refused with the expected count."""
        np.save(tmp_path / "y.npy", np.zeros(7))
        code = fit("--data", str(data), "--out", str(tmp_path / "p"), "--labels", str(tmp_path / "y.npy"))
        assert code == 2
        assert "expected 400 labels" in capsys.readouterr().err


class TestFitAdvice:
    """What `fit` says about a small reference: working thresholds, what is weak and what to do."""

    def test_small_reference_gets_thresholds_and_a_self_check(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """130 rows at --fpr 0.01: every threshold is a number (the former 25% split printed `never (too few
        rows)` for all), the calibration line names all rows, and the self-check reports the probes."""
        from sklearn.datasets import load_wine

        data = tmp_path / "wine.npy"
        np.save(data, load_wine().data[:130])
        assert fit("--data", str(data), "--out", str(tmp_path / "p")) == 0
        out = capsys.readouterr().out
        assert "never" not in out
        assert "calibration: all 130 reference rows" in out
        assert "note: 130 rows" in out
        assert "self-check, uniform noise inside the feature ranges" in out
        assert "1000+ rows give sharper tails" in out

    def test_unreachable_fpr_says_how_many_rows_or_which_fpr(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """80 rows cannot reach 1%: the output says so, with the rows needed and the smallest usable --fpr."""
        data = tmp_path / "small.npy"
        np.save(data, np.random.default_rng(1).normal(size=(80, 4)))
        assert fit("--data", str(data), "--out", str(tmp_path / "p"), "--fpr", "0.01") == 0
        out = capsys.readouterr().out
        assert "never (too few rows)" in out
        assert "weak: with 80 rows no detector can fire at --fpr 0.01" in out
        assert "give at least 99 rows, or use --fpr 0.012 or more" in out

    def test_far_out_probe_is_blocked_on_a_clean_reference(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """On 1,000 Gaussian rows the probe past the maxima is blocked: the self-check says 100% blocked."""
        data = tmp_path / "g.npy"
        np.save(data, np.random.default_rng(2).normal(size=(1000, 8)))
        assert fit("--data", str(data), "--out", str(tmp_path / "p")) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "past the maximum" in x)
        assert "100% blocked" in line
        assert "note:" not in out
