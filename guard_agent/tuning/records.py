"""Reading captured decisions back: capture files (``guard_agent.capture``) or plain decision-event logs.

A capture line is a decision event plus a ``capture`` object, so the reader
also accepts the guard's ordinary JSON event log (stdout, a SIEM export); those
lack policy lines and may have sampled allow events, which the tools report.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Capture", "CapturedDecision", "PolicySnapshot", "capture_files", "read_capture", "read_labels"]


@dataclass(frozen=True)
class PolicySnapshot:
    """The policy that was active when decisions were captured (as parsed data, plus what the guard could score)."""

    revision: str
    document: Mapping[str, Any]
    available_scores: frozenset[str]
    profile_revision: str | None = None


@dataclass(frozen=True, slots=True)
class CapturedDecision:
    """One inference decision as captured: the facts ``decide()`` saw and what it decided."""

    t: float
    request_id: str
    session: str
    source_ip: str | None
    model: str | None
    protocol: str
    rows: int
    body_bytes: int
    features: int
    session_source: str
    session_queries: int
    session_age_seconds: float
    scores: Mapping[str, float]
    action: str
    rule: str
    matched: tuple[str, ...]
    mode: str
    enforced: bool
    status: int
    policy_revision: str
    profile_revision: str | None
    scoring_failure: str | None = None
    exact_scores: bool = False
    sealed: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if not self.source_ip:
            return None
        try:
            return ipaddress.ip_address(self.source_ip)
        except ValueError:
            return None

    @property
    def refused(self) -> bool:
        """The guard did not forward the request (an enforced block or throttle)."""
        return self.enforced and self.action in ("block", "throttle")


@dataclass
class Capture:
    """Decisions in time order, the policies they were taken under, and what could not be read."""

    decisions: list[CapturedDecision] = field(default_factory=list)
    policies: dict[str, PolicySnapshot] = field(default_factory=dict)
    skipped_lines: int = 0
    files: tuple[str, ...] = ()

    @property
    def score_names(self) -> frozenset[str]:
        return frozenset(name for d in self.decisions for name in d.scores)

    def available_scores(self) -> frozenset[str]:
        """What the guard could compute while capturing (from policy lines; else every score seen)."""
        names: set[str] = set(self.score_names)
        for snap in self.policies.values():
            names |= snap.available_scores
        return frozenset(names)


def capture_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its ``*.jsonl`` files, oldest name first."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(p.glob("*.jsonl")))
        else:
            out.append(p)
    return out


def _timestamp(doc: Mapping[str, Any]) -> float:
    stamp = doc.get("@timestamp")
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def _failure(guard: Mapping[str, Any], rule: str) -> str | None:
    given = guard.get("scoring_failure")
    if given in ("error", "budget"):
        return str(given)
    if rule in ("scoring-error", "scoring-budget"):
        return rule.removeprefix("scoring-")
    return None


def _decision(doc: Mapping[str, Any], with_features: bool) -> CapturedDecision | None:
    guard = doc.get("guard")
    event = doc.get("event")
    if not isinstance(guard, Mapping) or not isinstance(event, Mapping) or "scores" not in guard:
        return None
    if "protocol" not in guard:  # not an inference decision (a reject before parsing, an operational log)
        return None
    capture = doc.get("capture") if isinstance(doc.get("capture"), Mapping) else {}
    assert isinstance(capture, Mapping)
    t = capture.get("t")
    if not isinstance(t, int | float):
        t = _timestamp(doc) - float(event.get("duration") or 0) / 1e9
    rule = str((doc.get("rule") or {}).get("name", "default"))
    return CapturedDecision(
        t=float(t),
        request_id=str(((doc.get("http") or {}).get("request") or {}).get("id", "")),
        session=str(guard.get("session") or ""),
        source_ip=(doc.get("source") or {}).get("ip"),
        model=guard.get("model"),
        protocol=str(guard.get("protocol", "v2")),
        rows=int(guard.get("rows") or 0),
        body_bytes=int(guard.get("body_bytes") or 0),
        features=int(guard.get("features") or 0),
        session_source=str(guard.get("session_source", "address")),
        session_queries=int(guard.get("session_queries") or 0),
        session_age_seconds=float(guard.get("session_age_seconds") or 0.0),
        scores={sys.intern(str(k)): float(v) for k, v in (guard.get("scores") or {}).items()},
        action=str(event.get("action", "allow")),
        rule=rule,
        matched=tuple(str(r) for r in guard.get("matched_rules") or ()),
        mode=str(guard.get("mode", "enforce")),
        enforced=bool(guard.get("enforced", True)),
        status=int(((doc.get("http") or {}).get("response") or {}).get("status_code") or 0),
        policy_revision=str(guard.get("policy_revision") or ""),
        profile_revision=guard.get("profile_revision"),
        scoring_failure=_failure(guard, rule),
        exact_scores=bool(capture.get("exact_scores", False)),
        sealed=capture.get("features") if with_features and isinstance(capture.get("features"), Mapping) else None,
    )


def _policy(capture: Mapping[str, Any]) -> PolicySnapshot | None:
    revision, document = capture.get("revision"), capture.get("document")
    if not isinstance(revision, str) or not isinstance(document, Mapping):
        return None
    return PolicySnapshot(revision=revision, document=document,
                          available_scores=frozenset(capture.get("available_scores") or ()),
                          profile_revision=capture.get("profile_revision"))


def read_capture(paths: Iterable[str | Path], *, with_features: bool = False) -> Capture:
    """Every decision and policy line in ``paths`` (files or directories), decisions sorted by time.

    Sealed features are kept only ``with_features`` (re-scoring needs them; they are most of a line's size).
    """
    result = Capture()
    files = capture_files(paths)
    result.files = tuple(str(p) for p in files)
    for path in files:
        with open(path, "rb") as fh:
            for raw in fh:
                line = raw.strip()
                if not line:
                    continue
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    result.skipped_lines += 1  # a torn last line after a crash, or foreign text
                    continue
                if not isinstance(doc, dict):
                    result.skipped_lines += 1
                    continue
                capture = doc.get("capture")
                if isinstance(capture, dict) and capture.get("kind") == "policy":
                    snap = _policy(capture)
                    if snap is not None:
                        result.policies[snap.revision] = snap
                    continue
                try:
                    decision = _decision(doc, with_features)
                except (TypeError, ValueError, AttributeError, KeyError):  # a malformed line: counted, not fatal
                    result.skipped_lines += 1
                    continue
                if decision is not None:
                    result.decisions.append(decision)
    result.decisions.sort(key=lambda d: d.t)
    return result


def read_labels(path: str | Path) -> frozenset[str]:
    """Attack sessions: one ``guard.session`` hash per line; blank lines and ``#`` comments ignored."""
    out: set[str] = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        value = line.split("#", 1)[0].strip()
        if value:
            out.add(value)
    return frozenset(out)
