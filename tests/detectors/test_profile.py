"""Profiles: calibrated scale, combined score, persistence format and tamper refusal."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from detectors import (
    COMBINED,
    DEFAULT_DETECTORS,
    Profile,
    ProfileError,
    fit_profile,
    load_profile,
    load_profiles,
    save_profile,
)

from .conftest import Gaussian


@pytest.fixture(scope="module")
def profile(reference: np.ndarray) -> Profile:
    return fit_profile(reference, fpr=0.05, seed=3)


@pytest.fixture(scope="module")
def fresh_scores(profile: Profile, gauss: Gaussian) -> dict[str, np.ndarray]:
    """Calibrated scores of 20,000 fresh in-distribution rows, computed once for the FPR tests."""
    return profile.score(gauss.sample(20000, seed=21))


@pytest.fixture
def saved(profile: Profile, tmp_path: Path) -> Path:
    out = tmp_path / "profile"
    save_profile(profile, out)
    return out


class TestCalibratedScores:
    def test_score_names_and_range(self, profile: Profile, gauss: Gaussian) -> None:
        """score() returns every default detector plus ood.combined, each a vector in [0, 1)."""
        scores = profile.score(gauss.sample(50, seed=20))
        assert set(scores) == {*DEFAULT_DETECTORS, COMBINED} == profile.score_names
        for values in scores.values():
            assert values.shape == (50,)
            assert values.min() >= 0.0
            assert values.max() < 1.0

    @pytest.mark.parametrize("name", ["ood.mahalanobis", "ood.knn", "ood.pca", "ood.iforest", COMBINED])
    def test_threshold_on_calibrated_scale_controls_fpr(self, fresh_scores: dict[str, np.ndarray], name: str) -> None:
        """A policy threshold t fires on about 1 - t of fresh inliers, for each detector and the combination."""
        scores = fresh_scores[name]
        for t in (0.9, 0.95, 0.99):
            assert abs(float(np.mean(scores > t)) - (1 - t)) < 0.3 * (1 - t) + 0.004

    def test_schema_never_exceeds_target_on_inliers(self, fresh_scores: dict[str, np.ndarray]) -> None:
        """The discrete schema score is conservative: at most about the target rate on inliers."""
        scores = fresh_scores["input.schema"]
        assert float(np.mean(scores > 0.95)) <= 0.05 + 0.01

    def test_outliers_score_near_one(self, profile: Profile, gauss: Gaussian) -> None:
        """Gross outliers get the maximum calibrated score on every detector and the combination."""
        far = gauss.sample(20, seed=23) + 50.0
        for name, values in profile.score(far).items():
            assert values.min() > 0.99, name

    def test_combined_defaults_to_calibrated_min(self, profile: Profile, gauss: Gaussian) -> None:
        """ood.combined defaults to the re-calibrated minimum p-value; raw_scores exposes its statistic."""
        raw = profile.raw_scores(gauss.sample(100, seed=24))
        assert set(raw) == profile.score_names
        assert profile.document["combined"]["params"]["method"] == "min"
        assert raw[COMBINED].min() >= 0.0

    def test_fisher_combination_available(self, reference: np.ndarray, gauss: Gaussian) -> None:
        """combine='fisher' is calibrated too."""
        prof = fit_profile(reference[:1500], fpr=0.05, combine="fisher", detectors=["mahalanobis", "pca", "knn"])
        scores = prof.score(gauss.sample(5000, seed=25))[COMBINED]
        assert abs(float(np.mean(scores > 0.95)) - 0.05) < 0.02

    def test_far_out_of_range_rows_score_exactly_one(self, profile: Profile, fresh_scores: dict[str,
    np.ndarray]) -> None:
        """Rows far beyond every calibration row reach 1.0 (p < 1e-16) on the schema and the combination, and
        p < 1e-9 on every distance detector (their fitted tails are heavy); no fresh inlier reaches 1 - 1e-6."""
        far = np.full((2, 8), 1e4)
        scores = profile.score(far)
        for name in ("input.schema", COMBINED):
            assert scores[name].min() == 1.0, name
        for name in ("ood.mahalanobis", "ood.knn", "ood.pca"):
            assert scores[name].min() > 1.0 - 1e-9, name
        for values in fresh_scores.values():
            assert values.max() < 1.0 - 1e-6

    def test_rejects_bad_rows(self, profile: Profile) -> None:
        """score() refuses NaN and a wrong feature count with ValueError."""
        with pytest.raises(ValueError, match="NaN"):
            profile.score(np.full((1, 8), np.nan))
        with pytest.raises(ValueError, match="expected 8"):
            profile.score(np.zeros((2, 7)))

    def test_one_dimensional_input_is_one_row(self, profile: Profile) -> None:
        """A 1-D vector of n_features values is scored as a single row."""
        assert profile.score(np.zeros(8))[COMBINED].shape == (1,)

    def test_subset_of_detectors(self, reference: np.ndarray) -> None:
        """--detectors accepts short names; only those (plus the combination) are provided."""
        prof = fit_profile(reference, detectors=["knn", "ood.pca"])
        assert prof.score_names == {"ood.knn", "ood.pca", COMBINED}

    def test_unknown_detector_refused(self, reference: np.ndarray) -> None:
        """An unknown detector name is a ProfileError listing the known ones."""
        with pytest.raises(ProfileError, match="unknown detector 'lof'"):
            fit_profile(reference, detectors=["lof"])


class TestFitEdgeCases:
    def test_too_few_rows_is_a_clear_error(self) -> None:
        """Fewer than 10 reference rows is refused with a message naming the minimum."""
        with pytest.raises(ProfileError, match="at least 10 rows, got 3"):
            fit_profile(np.zeros((3, 4)))

    def test_small_reference_never_fires_at_low_fpr(self) -> None:
        """12 rows give 12 (cross-conformal) calibration rows: 1% is unreachable, so thresholds are null and the
        distance scores stop at 1 - 1/13 (no tail below 20 rows); only the schema's unit tail extrapolates (and
        the combination's Bonferroni bound with it)."""
        prof = fit_profile(np.random.default_rng(0).normal(size=(12, 3)), fpr=0.01)
        assert prof.document["detectors"]["ood.knn"]["threshold"] is None
        assert prof.document["rows"]["calibration"] == 12
        scores = prof.score(np.full((1, 3), 100.0))
        for name in ("ood.mahalanobis", "ood.copula", "ood.knn", "ood.pca", "ood.iforest"):
            assert scores[name][0] <= 1 - 1 / 13 + 1e-12, name
        assert scores["input.schema"][0] == scores[COMBINED][0] == 1.0

    def test_constant_features_do_not_crash(self) -> None:
        """All-constant reference data fits; the constant value is normal, anything else is flagged."""
        prof = fit_profile(np.ones((200, 5)))
        assert prof.score(np.ones((1, 5)))["input.schema"][0] == 0.0
        assert prof.score(np.full((1, 5), 2.0))["input.schema"][0] > 0.9

    def test_labels_stratify_and_are_recorded(self, reference: np.ndarray) -> None:
        """Labels give per-class Mahalanobis means and are summarised in profile.json."""
        labels = (reference[:, 0] > np.median(reference[:, 0])).astype(int)
        prof = fit_profile(reference, labels=labels)
        assert prof.document["labels"]["classes"] == [0, 1]
        assert prof.document["detectors"]["ood.mahalanobis"]["params"]["n_classes"] == 2

    def test_label_length_mismatch_refused(self, reference: np.ndarray) -> None:
        """Labels must have one entry per row."""
        with pytest.raises(ProfileError, match="one label per row"):
            fit_profile(reference, labels=np.zeros(5))

    def test_continuous_labels_refused(self, reference: np.ndarray) -> None:
        """Regression targets passed as labels (one class per row) are refused with a hint."""
        with pytest.raises(ProfileError, match="class labels, not targets"):
            fit_profile(reference[:100], labels=np.arange(100))

    def test_nan_in_reference_refused(self) -> None:
        """NaN in the reference data is a ProfileError, not a silently broken profile."""
        X = np.zeros((50, 2))
        X[7, 1] = np.nan
        with pytest.raises(ProfileError, match="row 7, feature 1"):
            fit_profile(X)

    def test_clock_records_fit_seconds(self, reference: np.ndarray) -> None:
        """An injected clock measures each detector's fit time (the library reads none itself)."""
        ticks = iter(range(100))
        prof = fit_profile(reference[:300], clock=lambda: float(next(ticks)))
        assert set(prof.fit_seconds) == set(DEFAULT_DETECTORS)
        assert all(v == 1.0 for v in prof.fit_seconds.values())

    def test_same_seed_same_revision(self, reference: np.ndarray) -> None:
        """Fitting is deterministic: same data and seed give the same revision; another seed does not."""
        a = fit_profile(reference[:600], seed=1)
        b = fit_profile(reference[:600], seed=1)
        c = fit_profile(reference[:600], seed=2)
        assert a.revision == b.revision != c.revision


class TestPersistence:
    def test_round_trip_identical_scores_and_revision(self, profile: Profile, saved: Path, gauss: Gaussian) -> None:
        """load_profile(save_profile(p)) has p's revision and bit-identical scores."""
        loaded = load_profile(saved)
        assert loaded.revision == profile.revision
        X = gauss.sample(300, seed=30)
        a, b = profile.score(X), loaded.score(X)
        for name in profile.score_names:
            np.testing.assert_array_equal(a[name], b[name])

    def test_revision_is_sha256_of_profile_json(self, profile: Profile, saved: Path) -> None:
        """The revision is the sha256 of the profile.json bytes."""
        import hashlib

        assert profile.revision == hashlib.sha256((saved / "profile.json").read_bytes()).hexdigest()

    def test_profile_json_documents_each_detector(self, saved: Path) -> None:
        """profile.json holds version, features, params, thresholds, calibration FPR, kNN index kind,
        hashes."""
        doc = json.loads((saved / "profile.json").read_text())
        assert doc["schema_version"] == 3
        assert set(doc["detectors"]["ood.knn"]["params"]["tail"]) == {"base", "scale", "shape", "exceedances"}
        assert doc["n_features"] == 8
        assert len(doc["feature_names"]) == 8
        for entry in doc["detectors"].values():
            assert {"params", "threshold", "calibration_fpr", "file"} <= set(entry)
            assert len(doc["files"][entry["file"]]["sha256"]) == 64
        assert doc["detectors"]["ood.knn"]["params"]["index_kind"] in ("exact", "ivf")

    def test_no_pickle_in_array_files(self, saved: Path) -> None:
        """Every .npz member is a plain .npy with a numeric dtype (np.load with allow_pickle=False reads
        it)."""
        for npz in saved.glob("*.npz"):
            with np.load(npz, allow_pickle=False) as data:
                for key in data.files:
                    assert data[key].dtype.kind in "biuf"

    def test_tampered_array_refused(self, saved: Path) -> None:
        """Changing one byte of an array file fails the sha256 check."""
        target = saved / "ood.knn.npz"
        data = bytearray(target.read_bytes())
        data[-100] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(ProfileError, match=r"ood\.knn\.npz.*sha256"):
            load_profile(saved)

    def test_inconsistent_json_value_refused(self, saved: Path) -> None:
        """A parameter edited to contradict the arrays (k beyond the reference size) is refused."""
        doc = json.loads((saved / "profile.json").read_text())
        doc["detectors"]["ood.knn"]["params"]["k"] = doc["detectors"]["ood.knn"]["params"]["n_reference"] + 1
        (saved / "profile.json").write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
        with pytest.raises(ProfileError, match="inconsistent k"):
            load_profile(saved)

    def test_consistent_json_edit_changes_revision(self, profile: Profile, saved: Path) -> None:
        """A plausible edit cannot pass unnoticed: it loads only under a new revision (logged per
        decision)."""
        doc = json.loads((saved / "profile.json").read_text())
        doc["detectors"]["ood.knn"]["params"]["k"] = 1
        (saved / "profile.json").write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
        assert load_profile(saved).revision != profile.revision

    def test_non_canonical_json_refused(self, saved: Path) -> None:
        """Re-formatted or extended profile.json (not byte-identical to its canonical form) is refused."""
        doc = json.loads((saved / "profile.json").read_text())
        doc["note"] = "hand edit"
        (saved / "profile.json").write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
        with pytest.raises(ProfileError, match="canonical"):
            load_profile(saved)

    def test_swapped_array_file_with_matching_hash_is_checked_for_shape(self, saved: Path) -> None:
        """A replaced array file whose hash was updated in profile.json still fails the shape check."""
        doc = json.loads((saved / "profile.json").read_text())
        import hashlib

        from detectors._npz import npz_bytes, read_npz

        arrays = read_npz((saved / "ood.pca.npz").read_bytes())
        arrays["mean"] = np.zeros(3, dtype=np.float32)
        data = npz_bytes(arrays)
        (saved / "ood.pca.npz").write_bytes(data)
        doc["files"]["ood.pca.npz"]["sha256"] = hashlib.sha256(data).hexdigest()
        (saved / "profile.json").write_text(json.dumps(doc))
        with pytest.raises(ProfileError, match=r"ood\.pca\.npz.*shape"):
            load_profile(saved)

    def test_pickled_npz_member_refused(self, saved: Path) -> None:
        """An object array (which needs pickle) inside an array file is refused, never unpickled."""
        import hashlib
        import io

        doc = json.loads((saved / "profile.json").read_text())
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array([{"x": 1}], dtype=object), allow_pickle=True)
            zf.writestr("calibration_scores.npy", member.getvalue())
        (saved / "ood.combined.npz").write_bytes(buf.getvalue())
        doc["files"]["ood.combined.npz"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        (saved / "profile.json").write_text(json.dumps(doc))
        with pytest.raises(ProfileError, match="pickle"):
            load_profile(saved)

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (lambda d: d.update(schema_version=1), "schema_version 1 is not supported.*re-fit"),
            (lambda d: d.update(schema_version=4), "schema_version 4"),
            (lambda d: d.update(n_features=9), "feature_names|n_features"),
            (lambda d: d["files"].update({"../evil.npz": {"sha256": "0" * 64, "arrays": {}}}), "files index"),
            (lambda d: d["detectors"]["ood.knn"].update(file="../x.npz"), "files index|not allowed"),
            (lambda d: d.pop("files"), "'files' must be an object"),
        ],
    )
    def test_structural_json_edits_refused(self, saved: Path, edit: object, message: str) -> None:
        """Wrong schema version, inconsistent feature count or unsafe file names are refused with the
        reason."""
        doc = json.loads((saved / "profile.json").read_text())
        edit(doc)  # type: ignore[operator]
        (saved / "profile.json").write_text(json.dumps(doc))
        with pytest.raises(ProfileError, match=message):
            load_profile(saved)

    def test_duplicate_json_keys_refused(self, saved: Path) -> None:
        """Duplicate keys in profile.json are an error (no last-one-wins ambiguity)."""
        text = (saved / "profile.json").read_text()
        (saved / "profile.json").write_text(text.replace('"schema_version": 3', '"schema_version": 3, "fpr": 0.5', 1))
        with pytest.raises(ProfileError, match="duplicate key"):
            load_profile(saved)

    def test_missing_array_file_refused(self, saved: Path) -> None:
        """A deleted array file is reported by name."""
        (saved / "ood.iforest.npz").unlink()
        with pytest.raises(ProfileError, match=r"ood\.iforest\.npz.*missing"):
            load_profile(saved)

    def test_not_a_profile_directory(self, tmp_path: Path) -> None:
        """A directory without profile.json is refused with a hint."""
        with pytest.raises(ProfileError, match=r"profile\.json"):
            load_profile(tmp_path)

    def test_refuses_overwrite_without_force(self, profile: Profile, saved: Path) -> None:
        """Saving over an existing profile needs force; with force the directory is replaced atomically."""
        with pytest.raises(ProfileError, match="force"):
            save_profile(profile, saved)
        (saved / "stale.txt").write_text("old")
        save_profile(profile, saved, force=True)
        assert not (saved / "stale.txt").exists()
        assert load_profile(saved).revision == profile.revision
        assert [p.name for p in saved.parent.iterdir()] == ["profile"]

    def test_force_never_deletes_a_non_profile_directory(self, profile: Profile, tmp_path: Path) -> None:
        """force does not replace a non-empty directory that holds no profile.json."""
        precious = tmp_path / "data"
        precious.mkdir()
        (precious / "keep.txt").write_text("keep")
        with pytest.raises(ProfileError, match=r"does not hold a profile\.json"):
            save_profile(profile, precious, force=True)
        assert (precious / "keep.txt").read_text() == "keep"

    def test_extra_components_round_trip(self, reference: np.ndarray, tmp_path: Path) -> None:
        """Other parts' components are saved, hashed and loaded with the profile."""
        proj = np.arange(24, dtype=np.float32).reshape(8, 3)
        prof = fit_profile(reference[:400], extra_components={"tracker.projection": ({"bits": 3}, {"proj": proj})})
        save_profile(prof, tmp_path / "p")
        loaded = load_profile(tmp_path / "p")
        params, arrays = loaded.components["tracker.projection"]
        assert params == {"bits": 3}
        np.testing.assert_array_equal(arrays["proj"], proj)
        assert not arrays["proj"].flags.writeable
        assert "tracker.projection" not in loaded.score_names

    def test_extra_component_name_collision_refused(self, reference: np.ndarray) -> None:
        """An extra component may not shadow a detector."""
        with pytest.raises(ProfileError, match="collides"):
            fit_profile(reference[:100], extra_components={"ood.knn": ({}, {})})


class TestLoadProfiles:
    def test_single_profile_directory(self, profile: Profile, saved: Path) -> None:
        """A directory holding profile.json loads as one profile under the key ''."""
        loaded = load_profiles(saved)
        assert list(loaded) == [""]
        assert loaded[""].revision == profile.revision

    def test_directory_of_per_model_profiles(self, profile: Profile, tmp_path: Path) -> None:
        """<model>/profile.json subdirectories load keyed by model name; hidden and other dirs are skipped."""
        save_profile(profile, tmp_path / "digits")
        save_profile(profile, tmp_path / "iris")
        (tmp_path / ".tmp-x").mkdir()
        (tmp_path / "notes").mkdir()
        assert sorted(load_profiles(tmp_path)) == ["digits", "iris"]

    def test_empty_directory_refused(self, tmp_path: Path) -> None:
        """A directory with no profile at all is an error, not an empty mapping."""
        with pytest.raises(ProfileError, match=r"neither profile\.json"):
            load_profiles(tmp_path)


class TestHugeInputs:
    def test_huge_finite_values_score_one_without_warnings(self, profile: Profile) -> None:
        """Values near the float32 limit overflow inside detectors; the row still scores as anomalous, quietly."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scores = profile.score(np.full((1, 8), 3e38))
        assert scores[COMBINED][0] == 1.0
        assert all(np.isfinite(v).all() for v in scores.values())


class TestCombinedTail:
    def test_far_beyond_the_top_the_combination_is_the_bonferroni_bound(self, profile: Profile) -> None:
        """Past every detector's calibration maximum ood.combined is min(1/(n+1), k * min(detector p))."""
        far = np.full((3, 8), 40.0) * np.array([[1.0], [3.0], [10.0]])
        p = profile.p_values(far)
        detector_p = np.stack([p[name] for name in profile.detectors], axis=1)
        n = profile.combiner.calibration_scores_.size
        assert (detector_p <= 1 / (n + 1)).all()
        expected = np.minimum(1 / (n + 1), detector_p.shape[1] * detector_p.min(axis=1))
        np.testing.assert_allclose(p[COMBINED], np.maximum(expected, 1e-300))

    def test_a_row_past_one_maximum_ties_with_the_other_top_rows(self) -> None:
        """Full-conformal ties at the top: past one of 3 detector maxima p = 3/(n+1), past all 1/(n+1); deeper in
        a detector's tail the Bonferroni bound 3 * p takes over."""
        from detectors import PValueCombiner

        n = 100
        loo = np.random.default_rng(0).uniform(2 / n, 1.0, size=(n, 3))
        loo[[0, 1, 2], [0, 1, 2]] = 1 / n  # rows 0, 1, 2 hold the maxima of detectors 0, 1, 2
        comb = PValueCombiner().fit(loo)
        assert comb.top_rows_.tolist() == [0, 1, 2]
        edge = 1 / (n + 1)
        p = comb.p_values([[edge, 0.5, 0.5], [edge, edge, 0.5], [edge, edge, edge], [1e-9, 0.5, 0.5]])
        np.testing.assert_allclose(p, [3 * edge, 2 * edge, edge, 3e-9])
        loo[5, 0] = 1 / n  # a shared maximum: no single top row for detector 0
        assert PValueCombiner().fit(loo).top_rows_.tolist() == [-1, 1, 2]

    def test_no_overfiring_at_the_calibration_edge(self, profile: Profile, gauss: Gaussian) -> None:
        """A fresh row past one detector's maximum ties with the calibration rows at the top (one per detector),
        so p <= 1/(n_cal + 1) fires on at most ~1/(n_cal + 1) of inliers; ranking it alone overfired."""
        from detectors import combine_statistic
        from detectors._base import conformal_p_values

        p = profile.p_values(gauss.sample(20000, seed=21))
        edge = 1.0 / (profile.combiner.calibration_scores_.size + 1)
        assert float(np.mean(p[COMBINED] <= edge)) <= edge
        stat = combine_statistic(np.stack([p[name] for name in profile.detectors], axis=1), "min")
        alone = conformal_p_values(profile.combiner.calibration_scores_, stat)  # the former rule
        assert float(np.mean(alone <= edge)) > 1.3 * edge  # the test can fail: the former rule does


@pytest.fixture(scope="module")
def digits() -> tuple[Profile, np.ndarray]:
    """A profile fitted on the digits training split (as bench/attacks.py does) and the held-out test rows."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, _ = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    return fit_profile(X_tr, labels=y_tr, fpr=0.01, seed=0), X_te


@pytest.fixture(scope="module")
def thresholds() -> dict[str, tuple[str, float]]:
    """(score, gte threshold) of the default policy's stateless detector rules, by rule id."""
    import yaml

    policy = Path(__file__).resolve().parents[2] / "guard_agent" / "default_policy.yaml"
    out = {}
    for rule in yaml.safe_load(policy.read_text())["rules"]:
        if rule["id"] in ("ood-suspicious", "ood-extreme", "input-out-of-range"):
            ((score, cond),) = rule["when"].items()
            out[rule["id"]] = (score, float(cond["gte"]))
    assert len(out) == 3
    return out


class TestBenignPerturbations:
    """The default policy's stateless thresholds against digits: benign perturbations stay below the harden and
    block thresholds, noise mostly and far-out rows always reach them (the goal bench/attacks.py measures)."""

    def fired(self, profile: Profile, X: np.ndarray, rule: tuple[str, float]) -> float:
        score, threshold = rule
        return float(np.mean(profile.score(X)[score] >= threshold))

    def test_shifts_and_small_noise_are_never_hardened_or_blocked(
        self, digits: tuple[Profile, np.ndarray], thresholds: dict[str, tuple[str, float]]
    ) -> None:
        """One-pixel shifts (4 directions) and sigma=0.3 noise of held-out digits never reach ood-extreme or
        input-out-of-range (the former tails put 52% of right shifts at 1.0)."""
        profile, X_te = digits
        imgs = X_te.reshape(-1, 8, 8)
        shifts = np.vstack([np.roll(imgs, s, axis=a).reshape(-1, 64) for s in (-1, 1) for a in (1, 2)])
        noisy = np.clip(X_te + np.random.default_rng(0).normal(0, 0.3, X_te.shape), 0, 16)
        for X in (X_te, shifts, noisy):
            assert self.fired(profile, X, thresholds["ood-extreme"]) == 0.0
            assert self.fired(profile, X, thresholds["input-out-of-range"]) == 0.0
        assert self.fired(profile, X_te, thresholds["ood-suspicious"]) <= 0.005

    def test_noise_mostly_and_far_out_rows_always_reach_the_block_thresholds(
        self, digits: tuple[Profile, np.ndarray], thresholds: dict[str, tuple[str, float]]
    ) -> None:
        """Uniform noise images: at least half blocked by a stateless rule; values 50x the range: all, at 1.0."""
        profile, X_te = digits
        rng = np.random.default_rng(1)
        noise = rng.uniform(0, 16, size=X_te.shape)
        scores = profile.score(noise)
        blocked = np.zeros(len(noise), dtype=bool)
        for rule in ("ood-extreme", "input-out-of-range"):
            score, threshold = thresholds[rule]
            blocked |= scores[score] >= threshold
        assert float(np.mean(blocked)) >= 0.5
        assert float(np.mean(scores["ood.combined"] >= thresholds["ood-suspicious"][1])) == 1.0
        far = profile.score(noise * 50)
        assert far["ood.combined"].min() == far["input.schema"].min() == 1.0


class TestSchemaVersions:
    V2 = Path(__file__).resolve().parent / "data" / "profile_v2"

    def test_version_2_profile_loads_and_scores_as_before(self) -> None:
        """A version 2 profile (single held-out split, written by the former code) still loads, keeps its
        revision and gives the scores it gave then (recorded when it was written)."""
        profile = load_profile(self.V2)
        assert profile.document["schema_version"] == 2
        assert profile.revision == "0d3b828bd24923ec594625986d95c4a2a9d81c25daa946d8c35f213eb49570a7"
        X = np.random.default_rng(7).normal(size=(60, 3))
        scores = profile.score(np.vstack([X[:3], np.full((1, 3), 9.0)]))
        assert scores["ood.knn"].tolist() == [0.0625, 0.375, 0.1875, 0.9375]
        assert scores[COMBINED].tolist() == pytest.approx([0.0, 0.5, 0.3125, 0.9999542705281007], rel=1e-12)
        assert scores["input.schema"][3] == pytest.approx(0.9999885676320251, rel=1e-12)

    def test_new_profiles_are_version_3(self, saved: Path) -> None:
        assert json.loads((saved / "profile.json").read_text())["schema_version"] == 3

    @pytest.mark.parametrize("version", [1, 4, True])
    def test_other_versions_refused_with_a_refit_hint(self, tmp_path: Path, version: object) -> None:
        """Version 1 (exponential tails) and unknown versions are refused, naming the readable versions."""
        import shutil

        target = tmp_path / "p"
        shutil.copytree(self.V2, target)
        doc = json.loads((target / "profile.json").read_text())
        doc["schema_version"] = version
        (target / "profile.json").write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
        with pytest.raises(ProfileError, match=r"reads \(2, 3\); re-fit it with guard-agent fit"):
            load_profile(target)
