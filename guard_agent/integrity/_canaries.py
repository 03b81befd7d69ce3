"""The canary set format: ``canaries.json`` + one ``.npz`` (pinned by sha256), pickle-free.

Same safety rules as detector profiles: arrays load with ``allow_pickle=False``, the JSON pins the array
file's sha256, and the revision is the sha256 of the JSON bytes, so it names inputs and answers exactly.

``GUARD_CANARIES`` is one set (``canaries.json`` inside) or a directory of sets (``<name>/canaries.json``;
names starting with a dot are skipped, so a set can be staged as ``.v2`` and renamed into place).
A model passes if it answers one of its sets correctly; several sets for one model is how an update rolls
out without a false alarm (old and new set side by side, then drop the old one).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectors._npz import npz_bytes, read_npz

__all__ = [
    "CANARY_FILE",
    "KINDS",
    "PROTOCOLS",
    "CanaryError",
    "CanarySet",
    "canary_files",
    "load_canaries",
    "load_canary_dir",
    "save_canaries",
]

FORMAT = "inference-guard-canaries"
SCHEMA_VERSION = 1
CANARY_FILE = "canaries.json"
ARRAY_FILE = "canaries.npz"
KINDS = ("sample", "prototype", "boundary")
PROTOCOLS = ("v2", "v1")
DATATYPES = ("FP64", "FP32", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT8")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class CanaryError(ValueError):
    """A canary set is missing, malformed, or its arrays do not match their recorded hash."""


@dataclass(frozen=True, eq=False)
class CanarySet:
    """Inputs sent to the approved model and what it answered. Arrays are read-only."""

    model: str
    inputs: np.ndarray  # (n, features) float64
    labels: np.ndarray | None  # (n,) int64
    probabilities: np.ndarray | None  # (n, classes) float64
    kinds: tuple[str, ...]
    protocol: str = "v2"
    input_name: str = "input-0"
    datatype: str = "FP64"
    outputs: tuple[str, ...] = ()
    probability_atol: float = 1e-3
    metadata: Mapping[str, Any] | None = None
    recorded_at: str | None = None
    revision: str = ""
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.inputs.shape[0])


def _validate(cs: CanarySet) -> None:
    n = cs.inputs.shape[0] if cs.inputs.ndim == 2 else -1
    if cs.inputs.ndim != 2 or n < 1 or cs.inputs.shape[1] < 1:
        raise CanaryError(f"inputs must be a non-empty 2-D array, got shape {cs.inputs.shape}")
    if not np.isfinite(cs.inputs).all():
        raise CanaryError("inputs hold NaN or infinity")
    if not _NAME.match(cs.model):
        raise CanaryError(f"model name {cs.model!r} is not a plain name")
    if cs.protocol not in PROTOCOLS:
        raise CanaryError(f"protocol must be one of {PROTOCOLS}, got {cs.protocol!r}")
    if cs.datatype not in DATATYPES:
        raise CanaryError(f"datatype must be one of {DATATYPES}, got {cs.datatype!r}")
    if cs.labels is None and cs.probabilities is None:
        raise CanaryError("a canary set needs the model's labels, probabilities or both")
    if cs.labels is not None and cs.labels.shape != (n,):
        raise CanaryError(f"labels shape {cs.labels.shape} does not match {n} inputs")
    if cs.probabilities is not None:
        p = cs.probabilities
        if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2 or not np.isfinite(p).all():
            raise CanaryError(f"probabilities must be finite, shaped ({n}, classes >= 2); got {p.shape}")
    if len(cs.kinds) != n or any(k not in KINDS for k in cs.kinds):
        raise CanaryError(f"kinds must list one of {KINDS} per input")
    if not (math.isfinite(cs.probability_atol) and cs.probability_atol >= 0):
        raise CanaryError("probability_atol must be a finite number >= 0")


def _document(cs: CanarySet, array_sha: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": cs.model,
        "protocol": cs.protocol,
        "input_name": cs.input_name,
        "datatype": cs.datatype,
        "outputs": list(cs.outputs),
        "count": cs.count,
        "features": int(cs.inputs.shape[1]),
        "classes": None if cs.probabilities is None else int(cs.probabilities.shape[1]),
        "kinds": list(cs.kinds),
        "tolerance": {"probability_atol": cs.probability_atol, "labels": "exact"},
        "metadata": dict(cs.metadata) if cs.metadata is not None else None,
        "recorded_at": cs.recorded_at,
        "arrays": {"file": ARRAY_FILE, "sha256": array_sha},
        **({"extra": dict(cs.extra)} if cs.extra else {}),
    }


def save_canaries(cs: CanarySet, directory: str | os.PathLike[str], *, force: bool = False) -> str:
    """Write the set into ``directory`` (created); returns the revision. Refuses to overwrite unless ``force``."""
    _validate(cs)
    out = Path(directory)
    if (out / CANARY_FILE).exists() and not force:
        raise CanaryError(f"{out / CANARY_FILE} exists; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"inputs": np.asarray(cs.inputs, dtype=np.float64)}
    if cs.labels is not None:
        arrays["labels"] = np.asarray(cs.labels, dtype=np.int64)
    if cs.probabilities is not None:
        arrays["probabilities"] = np.asarray(cs.probabilities, dtype=np.float64)
    blob = npz_bytes(arrays)
    text = json.dumps(_document(cs, hashlib.sha256(blob).hexdigest()), indent=2, sort_keys=True) + "\n"
    _atomic_write(out / ARRAY_FILE, blob)
    _atomic_write(out / CANARY_FILE, text.encode())  # last: a reader never sees JSON pinning a missing array
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _need(doc: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise CanaryError(f"{where}: field {key!r} is missing or not a {getattr(typ, '__name__', typ)}")
    return value


def load_canaries(directory: str | os.PathLike[str]) -> CanarySet:
    """Load and verify one set; raises CanaryError naming the file and what is wrong."""
    d = Path(directory)
    where = str(d / CANARY_FILE)
    try:
        raw = (d / CANARY_FILE).read_bytes()
        doc = json.loads(raw)
    except OSError as exc:
        raise CanaryError(f"{where}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise CanaryError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CanaryError(f"{where}: not a canary set (format must be {FORMAT!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise CanaryError(f"{where}: unsupported schema_version {doc.get('schema_version')!r}")
    arrays_doc = _need(doc, "arrays", dict, where)
    file_name = _need(arrays_doc, "file", str, where)
    if file_name != ARRAY_FILE:
        raise CanaryError(f"{where}: array file must be {ARRAY_FILE!r}, got {file_name!r}")
    try:
        blob = (d / ARRAY_FILE).read_bytes()
    except OSError as exc:
        raise CanaryError(f"{d / ARRAY_FILE}: cannot read ({exc.strerror})") from exc
    if hashlib.sha256(blob).hexdigest() != arrays_doc.get("sha256"):
        raise CanaryError(f"{d / ARRAY_FILE}: sha256 does not match {CANARY_FILE}")
    try:
        arrays = read_npz(blob)
    except (ValueError, OSError, EOFError) as exc:
        raise CanaryError(f"{d / ARRAY_FILE}: not a readable pickle-free .npz ({exc})") from exc
    if "inputs" not in arrays or arrays["inputs"].dtype.kind not in "fiu":
        raise CanaryError(f"{d / ARRAY_FILE}: numeric 'inputs' array missing")
    tol = _need(doc, "tolerance", dict, where)
    atol = tol.get("probability_atol")
    if isinstance(atol, bool) or not isinstance(atol, int | float):
        raise CanaryError(f"{where}: tolerance.probability_atol must be a number")
    metadata = doc.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise CanaryError(f"{where}: metadata must be an object or null")
    kinds = _need(doc, "kinds", list, where)
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise CanaryError(f"{where}: outputs must be a list of names")
    labels = arrays.get("labels")
    probs = arrays.get("probabilities")
    cs = CanarySet(
        model=_need(doc, "model", str, where),
        inputs=_frozen(arrays["inputs"].astype(np.float64)),
        labels=None if labels is None else _frozen(_as_int(labels, d)),
        probabilities=None if probs is None else _frozen(probs.astype(np.float64)),
        kinds=tuple(str(k) for k in kinds),
        protocol=_need(doc, "protocol", str, where),
        input_name=_need(doc, "input_name", str, where),
        datatype=_need(doc, "datatype", str, where),
        outputs=tuple(outputs),
        probability_atol=float(atol),
        metadata=metadata,
        recorded_at=doc.get("recorded_at") if isinstance(doc.get("recorded_at"), str) else None,
        revision=hashlib.sha256(raw).hexdigest(),
        source=str(d),
    )
    try:
        _validate(cs)
    except CanaryError as exc:
        raise CanaryError(f"{where}: {exc}") from None
    if doc.get("count") != cs.count:
        raise CanaryError(f"{where}: count {doc.get('count')!r} does not match {cs.count} stored inputs")
    return cs


def _as_int(arr: np.ndarray, d: Path) -> np.ndarray:
    if arr.dtype.kind not in "iu":
        raise CanaryError(f"{d / ARRAY_FILE}: labels must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def canary_files(path: str | os.PathLike[str]) -> list[Path]:
    """The ``canaries.json`` files a canary path holds: its own, else one per immediate subdirectory."""
    p = Path(path)
    if (p / CANARY_FILE).is_file():
        return [p / CANARY_FILE]
    if not p.is_dir():
        return []
    return sorted(d / CANARY_FILE for d in p.iterdir()  # dot-directories: kubelet bookkeeping, staging copies
                  if not d.name.startswith(".") and (d / CANARY_FILE).is_file())


def load_canary_dir(path: str | os.PathLike[str]) -> tuple[CanarySet, ...]:
    """Every set under ``path``; all must load, or CanaryError (so a reload is all-or-nothing)."""
    files = canary_files(path)
    if not files:
        raise CanaryError(f"{path}: no {CANARY_FILE} here nor in any subdirectory")
    return tuple(load_canaries(f.parent) for f in files)


def group_by_model(sets: Sequence[CanarySet]) -> dict[str, tuple[CanarySet, ...]]:
    """Sets per model name, in load order."""
    out: dict[str, list[CanarySet]] = {}
    for cs in sets:
        out.setdefault(cs.model, []).append(cs)
    return {m: tuple(v) for m, v in out.items()}
