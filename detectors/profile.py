"""Calibrated detector profiles: fit on reference data, score on the calibrated [0, 1] scale, save/load
safely.

A profile directory holds `profile.json` (schema version, features, every detector's parameters, thresholds
and the sha256 of each array file) and one deterministic `.npz` per component. `revision` is the sha256 of the
`profile.json` bytes, which pin every array file through their hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from ._base import BaseDetector, conformal_threshold, loo_p_values
from ._errors import ProfileError
from ._npz import npz_bytes, read_npz
from ._reference import load_reference
from ._validation import FloatArray, as_rows, as_rows32, finite_scores
from .combine import METHODS, PValueCombiner, combine_statistic
from .copula import CopulaMahalanobis
from .iforest import IsolationForestDetector
from .knn import KNNDistance
from .mahalanobis import Mahalanobis
from .pca import PCAReconstruction
from .schema import SchemaRange

__all__ = [
    "COMBINED",
    "DEFAULT_DETECTORS",
    "DETECTOR_CLASSES",
    "MIN_REFERENCE_ROWS",
    "SCHEMA_VERSION",
    "Profile",
    "ProfileError",
    "fit_profile",
    "load_profile",
    "load_profiles",
    "load_reference",
    "save_profile",
]

# 2: generalised Pareto tails (`tail`), combined top rows, pooled schema scales. 3: cross-conformal calibration
# on every reference row (`calibration`), `ood.copula`, shrunk feature scales, exponential schema tail.
SCHEMA_VERSION = 3
# versions load_profile still reads: a version 2 profile scores exactly as it did (its arrays and tails hold
# everything); it is re-saved unchanged, so its revision stays the same
READABLE_VERSIONS = (2, 3)
FORMAT = "inference-guard-profile"
COMBINED = "ood.combined"
MIN_REFERENCE_ROWS = 10
DETECTOR_CLASSES: Mapping[str, type[BaseDetector]] = MappingProxyType(
    {
        "input.schema": SchemaRange,
        "ood.mahalanobis": Mahalanobis,
        "ood.copula": CopulaMahalanobis,
        "ood.knn": KNNDistance,
        "ood.pca": PCAReconstruction,
        "ood.iforest": IsolationForestDetector,
    }
)
DEFAULT_DETECTORS: tuple[str, ...] = tuple(DETECTOR_CLASSES)
_SHORT_NAMES = {name.split(".", 1)[1]: name for name in DETECTOR_CLASSES}
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}\.npz$")

Component = tuple[Mapping[str, Any], Mapping[str, np.ndarray]]


@dataclass(frozen=True, eq=False)  # identity semantics: hashable, usable as a cache key
class Profile:
    """A fitted, calibrated set of detectors. Immutable; arrays are read-only.

    `components` maps every stored component (detectors, the combiner and extra components of other parts,
    e.g. a session tracker's projection) to its JSON parameters and arrays.
    """

    revision: str
    n_features: int
    feature_names: tuple[str, ...]
    score_names: frozenset[str]
    components: Mapping[str, Component]
    detectors: Mapping[str, BaseDetector] = field(repr=False)
    combiner: PValueCombiner = field(repr=False)
    document: Mapping[str, Any] = field(repr=False)
    fit_seconds: Mapping[str, float] = field(default_factory=dict, repr=False, compare=False)
    _json: bytes = field(default=b"", repr=False, compare=False)
    _files: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_items", tuple(self.detectors.items()))

    def _rows(self, X: npt.ArrayLike) -> npt.NDArray[np.float32]:
        return as_rows32(X, n_features=self.n_features)

    def _p_matrix(self, X: npt.ArrayLike) -> FloatArray:
        X32 = self._rows(X)
        items: tuple[tuple[str, BaseDetector], ...] = self._items  # type: ignore[attr-defined]
        P = np.empty((X32.shape[0], len(items) + 1))
        # huge finite inputs may overflow float32 to inf (a p-value at the floor): no warning spam on stderr
        with np.errstate(over="ignore", invalid="ignore"):
            for j, (_, det) in enumerate(items):
                P[:, j] = det.p_values(finite_scores(det._score(X32)))
            P[:, -1] = self.combiner.p_values(P[:, :-1])
        return P

    def p_values(self, X: npt.ArrayLike) -> dict[str, FloatArray]:
        """Per-row conformal p-values (small = anomalous) of every detector and of the combination."""
        P = self._p_matrix(X)
        return {name: P[:, j] for j, name in enumerate([*self.detectors, COMBINED])}

    def score(self, X: npt.ArrayLike) -> dict[str, FloatArray]:
        """Per-row calibrated scores in [0, 1], higher = more anomalous: 1 - conformal p-value.

        A threshold t fires on about (1 - t) of in-distribution rows for every detector and for `ood.combined`
        (the smallest detector p-value, re-calibrated on the calibration split; see `PValueCombiner`), whatever
        the model. Rows beyond every calibration score get a p-value below 1/(n_cal + 1) from each detector's
        fitted tail (conservative: at least exponential, heavier where the calibration scores are heavy-tailed;
        floored at 1e-300) and, for `ood.combined`, the dependence-free Bonferroni bound over the detectors, so
        thresholds above 1 - 1/(n_cal + 1) rely on that tail model; a score of exactly 1.0 means p < 1.1e-16
        (far beyond every calibration row).
        Raises ValueError on NaN/Inf, a wrong feature count or a non-numeric input.
        """
        S = 1.0 - self._p_matrix(X)
        return {name: S[:, j] for j, name in enumerate([*self.detectors, COMBINED])}

    def raw_scores(self, X: npt.ArrayLike) -> dict[str, FloatArray]:
        """Uncalibrated detector scores (and the combined statistic) for benchmarks and debugging."""
        X32 = self._rows(X)
        raw = {name: finite_scores(det._score(X32)) for name, det in self.detectors.items()}
        p_matrix = np.stack([det.p_values(raw[name]) for name, det in self.detectors.items()], axis=1)
        raw[COMBINED] = combine_statistic(p_matrix, self.combiner.method)
        return raw


# -- fitting -------------------------------------------------------------------------------------------------
def _resolve_detectors(detectors: Sequence[str] | None) -> tuple[str, ...]:
    if detectors is None:
        return DEFAULT_DETECTORS
    names: list[str] = []
    for raw in detectors:
        name = _SHORT_NAMES.get(raw.strip(), raw.strip())
        if name not in DETECTOR_CLASSES:
            known = ", ".join(sorted([*DETECTOR_CLASSES, *_SHORT_NAMES]))
            raise ProfileError(f"unknown detector {raw!r}; known: {known}")
        if name not in names:
            names.append(name)
    if not names:
        raise ProfileError("no detectors selected")
    return tuple(names)


def n_folds(n: int) -> int:
    """Cross-conformal folds: 10 below 1,000 rows (each fold model sees 90% of a small reference), else 5."""
    return min(n, 10 if n < 1000 else 5)


def _folds(n: int, labels: npt.NDArray[Any] | None, seed: int, k: int) -> npt.NDArray[np.intp]:
    """Fold number of every row: a random assignment, stratified by label when labels are given (each class is
    dealt round-robin over the folds, so every fold holds its share of every class)."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    fold = np.empty(n, dtype=np.intp)
    start = 0
    for g in groups:
        g = rng.permutation(g)
        fold[g] = (start + np.arange(g.size)) % k
        start += g.size
    return fold


def fit_profile(
    X: npt.ArrayLike,
    *,
    labels: npt.ArrayLike | None = None,
    fpr: float = 0.01,
    seed: int = 0,
    detectors: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    extra_components: Mapping[str, tuple[Mapping[str, Any], Mapping[str, np.ndarray]]] | None = None,
    combine: str = "min",
    clock: Callable[[], float] | None = None,
) -> Profile:
    """Split off a calibration part (25%, stratified by label), fit each detector, calibrate, return a
    Profile.

    Needs at least MIN_REFERENCE_ROWS rows. With few calibration rows a low `fpr` cannot be reached: the
    threshold is then +inf (recorded as null), and below 20 calibration rows no tail is fitted either, so
    scores stay at or below 1 - 1/(n_cal + 1) except for the schema detector's unit tail.
    `clock` (e.g. time.perf_counter), when given, records each detector's fit time in `fit_seconds`;
    the library itself reads no clock.
    """
    try:
        X64 = as_rows(X)
    except ValueError as exc:
        raise ProfileError(f"reference data: {exc}") from exc
    n, d = X64.shape
    if n < MIN_REFERENCE_ROWS:
        raise ProfileError(f"reference data: need at least {MIN_REFERENCE_ROWS} rows, got {n}")
    if not 0.0 < fpr < 1.0:
        raise ProfileError(f"fpr must be in (0, 1), got {fpr}")
    if combine not in METHODS:
        raise ProfileError(f"combine must be one of {METHODS}, got {combine!r}")
    names = _resolve_detectors(detectors)
    if feature_names is None:
        feature_names = [f"x{i}" for i in range(d)]
    if len(feature_names) != d:
        raise ProfileError(f"feature_names has {len(feature_names)} names for {d} features")
    y = None if labels is None else np.asarray(labels)
    if y is not None and (y.ndim != 1 or y.shape[0] != n):
        raise ProfileError(f"labels must be a vector with one label per row ({n}), got shape {y.shape}")
    if y is not None and y.dtype.kind not in "biuUS" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
        raise ProfileError(f"labels must be integers or strings (class ids), got dtype {y.dtype}")
    if y is not None and np.unique(y).size > n // 2:
        raise ProfileError(
            f"labels have {np.unique(y).size} distinct values for {n} rows: pass class labels, not targets"
        )
    k = n_folds(n)
    fold = _folds(n, y, seed, k)
    fitted: dict[str, BaseDetector] = {}
    seconds: dict[str, float] = {}
    oof: dict[str, FloatArray] = {}
    for name in names:
        start = clock() if clock else 0.0
        det, oof[name] = _cross_fit(name, X64, y, fold, k, seed)
        det.calibrate(oof[name], fpr)
        if clock:
            seconds[name] = clock() - start
        fitted[name] = det
    combiner = PValueCombiner(method=combine)
    cal_p = np.stack([loo_p_values(det.calibration_scores_, oof[name]) for name, det in fitted.items()], axis=1)
    combiner.fit(cal_p)
    label_info = None
    if y is not None:
        classes, counts = np.unique(y, return_counts=True)
        label_info = {
            "classes": [c.item() if hasattr(c, "item") else str(c) for c in classes],
            "counts": [int(c) for c in counts],
        }
    meta = {
        "fpr": float(fpr),
        "seed": int(seed),
        "labels": label_info,
        "rows": {"reference": n, "fit": n, "calibration": n},
        "calibration": {"method": "cross-conformal", "folds": k},
    }
    extras = dict(extra_components or {})
    return _assemble(d, tuple(str(f) for f in feature_names), fitted, combiner, extras, meta, seconds)


def _new_detector(name: str, seed: int) -> BaseDetector:
    cls = DETECTOR_CLASSES[name]
    return cls(seed=seed) if name in ("ood.knn", "ood.iforest") else cls()  # type: ignore[call-arg]


def _cross_fit(
    name: str, X: FloatArray, y: npt.NDArray[Any] | None, fold: npt.NDArray[np.intp], k: int, seed: int
) -> tuple[BaseDetector, FloatArray]:
    """The detector fitted on every row, and every row's out-of-fold score: scored by a model fitted on the
    other k - 1 folds, which never saw it (cross-conformal calibration)."""
    oof = np.empty(X.shape[0])
    for f in range(k):
        held = fold == f
        if not held.any():
            continue
        part = _new_detector(name, seed).fit(X[~held], None if y is None else y[~held])
        oof[held] = part.score_samples(X[held])
    return _new_detector(name, seed).fit(X, y), oof


def _calibration_fpr(sorted_cal: FloatArray, threshold: float) -> float:
    return float(np.mean(sorted_cal > threshold)) if math.isfinite(threshold) else 0.0


def _json_threshold(value: float) -> float | None:
    return None if math.isinf(value) else float(value)


def _assemble(
    n_features: int,
    feature_names: tuple[str, ...],
    fitted: Mapping[str, BaseDetector],
    combiner: PValueCombiner,
    extras: Mapping[str, tuple[Mapping[str, Any], Mapping[str, np.ndarray]]],
    meta: Mapping[str, Any],
    seconds: Mapping[str, float],
) -> Profile:
    """Serialise every component deterministically and build the immutable Profile around the bytes."""
    components: dict[str, Component] = {}
    files: dict[str, bytes] = {}
    file_index: dict[str, Any] = {}

    def add(name: str, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray], file_name: str) -> None:
        frozen = {}
        for key, arr in arrays.items():
            a = np.array(arr, copy=True)
            a.setflags(write=False)
            frozen[key] = a
        data = npz_bytes(frozen)
        files[file_name] = data
        file_index[file_name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in sorted(frozen.items())},
        }
        components[name] = (MappingProxyType(dict(params)), MappingProxyType(frozen))

    detectors_doc: dict[str, Any] = {}
    fpr = float(meta["fpr"])
    for name, det in fitted.items():
        params, det_arrays = det.get_state()
        add(name, params, det_arrays, f"{name}.npz")
        detectors_doc[name] = {
            "class": type(det).__name__,
            "params": params,
            "file": f"{name}.npz",
            "threshold": _json_threshold(det.threshold_),
            "calibration_fpr": _calibration_fpr(det.calibration_scores_, det.threshold_),
        }
    comb_threshold = conformal_threshold(combiner.calibration_scores_, fpr)
    comb_params = {"method": combiner.method}
    comb_arrays = {"calibration_scores": combiner.calibration_scores_, "top_rows": combiner.top_rows_}
    add(COMBINED, comb_params, comb_arrays, f"{COMBINED}.npz")
    extras_doc: dict[str, Any] = {}
    for name, (extra_params, extra_arrays) in extras.items():
        if not _COMPONENT_NAME.match(name) or name in fitted or name == COMBINED:
            raise ProfileError(f"extra component name {name!r} is invalid or collides with a detector")
        file_name = f"component.{name}.npz"
        try:
            json.dumps(dict(extra_params), allow_nan=False)
            add(name, extra_params, extra_arrays, file_name)
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"extra component {name!r}: {exc}") from exc
        extras_doc[name] = {"params": dict(extra_params), "file": file_name}
    document = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "n_features": n_features,
        "feature_names": list(feature_names),
        **meta,
        "detectors": detectors_doc,
        "combined": {
            "params": comb_params,
            "file": f"{COMBINED}.npz",
            "threshold": _json_threshold(comb_threshold),
            "calibration_fpr": _calibration_fpr(combiner.calibration_scores_, comb_threshold),
        },
        "components": extras_doc,
        "files": file_index,
    }
    try:
        text = json.dumps(document, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise ProfileError(f"profile parameters are not JSON-safe: {exc}") from exc
    raw = text.encode("utf-8")
    return Profile(
        revision=hashlib.sha256(raw).hexdigest(),
        n_features=n_features,
        feature_names=feature_names,
        score_names=frozenset([*fitted, COMBINED]),
        components=MappingProxyType(components),
        detectors=MappingProxyType(dict(fitted)),
        combiner=combiner,
        document=MappingProxyType(json.loads(text)),
        fit_seconds=MappingProxyType(dict(seconds)),
        _json=raw,
        _files=MappingProxyType(files),
    )


# -- persistence ---------------------------------------------------------------------------------------------
def save_profile(profile: Profile, directory: str | Path, *, force: bool = False) -> None:
    """Write the profile directory atomically (temporary sibling, then rename); profile.json appears last.

    An existing non-empty directory is only replaced with `force=True`, and only when it holds a profile.json
    (a directory that is not a profile is never deleted).
    """
    target = Path(directory)
    if not profile._json:
        raise ProfileError("profile has no serialised form; build it with fit_profile or load_profile")
    exists = target.exists()
    if exists and not target.is_dir():
        raise ProfileError(f"{target}: exists and is not a directory")
    non_empty = exists and any(target.iterdir())
    if non_empty and not force:
        raise ProfileError(f"{target}: already exists and is not empty; use force to overwrite")
    if non_empty and not (target / "profile.json").is_file():
        raise ProfileError(f"{target}: refusing to replace a directory that does not hold a profile.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, data in profile._files.items():
            (tmp / name).write_bytes(data)
        (tmp / "profile.json").write_bytes(profile._json)
        tmp.chmod(0o750)  # reference data is sensitive: no world access
        if exists:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "profile")
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ProfileError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _expect(cond: bool, where: Path, message: str) -> None:
    if not cond:
        raise ProfileError(f"{where}: {message}")


def load_profile(directory: str | Path) -> Profile:
    """Load and verify a profile directory: schema version, sha256 of every array file, array keys, shapes and
    dtypes, and each detector's own consistency checks. Anything else is refused with ProfileError."""
    root = Path(directory)
    doc_path = root / "profile.json"
    _expect(doc_path.is_file(), doc_path, "not found (is this a profile directory?)")
    raw = doc_path.read_bytes()
    try:
        doc = json.loads(raw, object_pairs_hook=_reject_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{doc_path}: invalid JSON ({exc})") from exc
    _expect(isinstance(doc, dict), doc_path, "top level must be an object")
    _expect(doc.get("format") == FORMAT, doc_path, f"format must be {FORMAT!r}")
    version = doc.get("schema_version")
    _expect(
        version in READABLE_VERSIONS and not isinstance(version, bool),
        doc_path,
        f"schema_version {version!r} is not supported (this version reads {READABLE_VERSIONS}; re-fit it with "
        "guard-agent fit)",
    )
    n_features = doc.get("n_features")
    _expect(
        isinstance(n_features, int) and not isinstance(n_features, bool) and n_features > 0,
        doc_path,
        "n_features must be a positive integer",
    )
    names = doc.get("feature_names")
    _expect(
        isinstance(names, list) and len(names) == n_features and all(isinstance(x, str) for x in names),
        doc_path,
        "feature_names must list one string per feature",
    )
    fpr = doc.get("fpr")
    _expect(isinstance(fpr, float) and 0.0 < fpr < 1.0, doc_path, "fpr must be a number in (0, 1)")
    for section in ("detectors", "combined", "components", "files"):
        _expect(isinstance(doc.get(section), dict), doc_path, f"{section!r} must be an object")
    file_index: dict[str, Any] = doc["files"]
    referenced = [
        entry.get("file")
        for entry in [*doc["detectors"].values(), doc["combined"], *doc["components"].values()]
        if isinstance(entry, dict)
    ]
    _expect(
        sorted(map(str, referenced)) == sorted(file_index),
        doc_path,
        "the files index does not match the files the components reference",
    )
    arrays_by_file = {name: _load_array_file(root, name, spec, doc_path) for name, spec in file_index.items()}

    fitted: dict[str, BaseDetector] = {}
    components: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
    _expect(len(doc["detectors"]) > 0, doc_path, "no detectors")
    for name, entry in doc["detectors"].items():
        cls = DETECTOR_CLASSES.get(name)
        _expect(cls is not None, doc_path, f"unknown detector {name!r}")
        assert cls is not None
        _expect(
            isinstance(entry, dict) and entry.get("class") == cls.__name__ and isinstance(entry.get("params"), dict),
            doc_path,
            f"detector {name!r}: class must be {cls.__name__} with a params object",
        )
        arrays = arrays_by_file[entry["file"]]
        params = entry["params"]
        _expect(params.get("n_features") == n_features, doc_path, f"detector {name!r}: n_features mismatch")
        _expect("calibration_scores" in arrays, root / entry["file"], "calibration_scores missing")
        try:
            fitted[name] = cls.from_state(params, arrays)
        except ValueError as exc:
            raise ProfileError(f"{root / entry['file']}: {exc}") from exc
        components[name] = (params, arrays)
    comb = doc["combined"]
    method = comb.get("params", {}).get("method") if isinstance(comb.get("params"), dict) else None
    _expect(method in METHODS, doc_path, f"combined method must be one of {METHODS}")
    comb_arrays = arrays_by_file[comb["file"]]
    cal = comb_arrays.get("calibration_scores")
    _expect(
        cal is not None
        and cal.ndim == 1
        and cal.size > 0
        and bool(np.isfinite(cal).all())
        and not bool(np.any(np.diff(cal) < 0)),
        root / comb["file"],
        "calibration_scores must be sorted and finite",
    )
    top = comb_arrays.get("top_rows")
    _expect(
        top is not None
        and top.shape == (len(doc["detectors"]),)
        and top.dtype.kind == "i"
        and bool(np.all((top >= -1) & (top < (cal.size if cal is not None else 0)))),
        root / comb["file"],
        "top_rows must hold one calibration row index (or -1) per detector",
    )
    combiner = PValueCombiner(method=str(method))
    assert cal is not None
    assert top is not None
    combiner.calibration_scores_ = cal.astype(np.float64)
    combiner.top_rows_ = top.astype(np.int64)
    components[COMBINED] = (comb["params"], comb_arrays)
    extras: dict[str, tuple[Mapping[str, Any], Mapping[str, np.ndarray]]] = {}
    for name, entry in doc["components"].items():
        _expect(
            isinstance(entry, dict) and isinstance(entry.get("params"), dict),
            doc_path,
            f"component {name!r} needs a params object",
        )
        extras[name] = (entry["params"], arrays_by_file[entry["file"]])
    meta = {k: doc[k] for k in ("schema_version", "fpr", "seed", "labels", "rows", "calibration") if k in doc}
    profile = _assemble(n_features, tuple(names), fitted, combiner, extras, meta, {})
    # the rebuilt bytes must be the bytes on disk: catches edits that still parse (reordered, reformatted,
    # extra keys)
    _expect(
        profile.revision == hashlib.sha256(raw).hexdigest(),
        doc_path,
        "content does not match its canonical form (edited by hand?)",
    )
    return profile


def load_profiles(directory: str | Path) -> dict[str, Profile]:
    """Load `GUARD_PROFILE`: one profile directory (returned under the key "") or a directory of per-model
    profiles `<model>/profile.json` (keyed by model name). Any broken profile raises ProfileError."""
    root = Path(directory)
    if (root / "profile.json").is_file():
        return {"": load_profile(root)}
    if not root.is_dir():
        raise ProfileError(f"{root}: not a directory")
    found = {
        child.name: load_profile(child)
        for child in sorted(root.iterdir())
        if child.is_dir() and not child.name.startswith(".") and (child / "profile.json").is_file()
    }
    if not found:
        raise ProfileError(f"{root}: holds neither profile.json nor <model>/profile.json")
    return found


def _load_array_file(root: Path, name: str, spec: Any, doc_path: Path) -> dict[str, np.ndarray]:
    """Read one array file, check it against its sha256, keys, shapes and dtypes from profile.json."""
    _expect(bool(_FILE_NAME.match(name)), doc_path, f"array file name {name!r} is not allowed")
    _expect(
        isinstance(spec, dict) and isinstance(spec.get("sha256"), str) and isinstance(spec.get("arrays"), dict),
        doc_path,
        f"files[{name!r}] needs sha256 and arrays",
    )
    path = root / name
    _expect(path.is_file() and not path.is_symlink(), path, "array file missing (or a symlink)")
    data = path.read_bytes()
    _expect(
        hashlib.sha256(data).hexdigest() == spec["sha256"],
        path,
        "sha256 does not match profile.json (tampered?)",
    )
    try:
        arrays = read_npz(data)
    except (ValueError, OSError, EOFError) as exc:
        raise ProfileError(f"{path}: not a pickle-free npz archive ({exc})") from exc
    _expect(set(arrays) == set(spec["arrays"]), path, f"array keys {sorted(arrays)} differ from profile.json")
    for key, arr in arrays.items():
        want = spec["arrays"][key]
        _expect(
            isinstance(want, dict) and list(arr.shape) == want.get("shape") and arr.dtype.str == want.get("dtype"),
            path,
            f"array {key!r} has shape {list(arr.shape)} dtype {arr.dtype.str}, profile.json says {want}",
        )
        arr.setflags(write=False)
    return arrays
