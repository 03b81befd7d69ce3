"""The background integrity checker: canary replay, metadata comparison and signed-file verification.

Runs beside the request path, never in it: ``score(model)`` only reads the last verdict (a dict lookup).
Canaries are replayed at start and then every ``canary_interval`` seconds with +-10% jitter (so replicas do
not probe in step and a model cannot learn a fixed schedule); while the model cannot be reached, the check
retries with back-off and the verdict stays as it was (unreachable is not tampered: clients get 502s then).
The signed model directory is verified before the guard serves, whenever a file's identity changes (polled)
and in full once per canary interval (a rewrite that kept size and mtime is caught then).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from guard_agent.contracts import Integrity
from guard_agent.integrity._canaries import (
    ARRAY_FILE,
    CanaryError,
    CanarySet,
    canary_files,
    group_by_model,
    load_canary_dir,
)
from guard_agent.integrity._compare import CanaryResult, compare_answers, metadata_changes
from guard_agent.integrity._metrics import IntegrityMetrics
from guard_agent.integrity._signing import (
    Problem,
    SigningError,
    VerifyReport,
    directory_snapshot,
    load_public_key,
    verify_directory,
)
from guard_agent.integrity._upstream import Answer, UpstreamError, fetch_metadata, infer
from guard_agent.policy.decide import INTEGRITY_RULE
from guard_agent.settings import ConfigError
from guard_agent.state import GuardState

__all__ = ["IntegrityChecker", "make_integrity"]

ALERT = {"kind": "alert", "category": ["intrusion_detection"], "action": "integrity_violation",
         "outcome": "failure"}
THREAT = {"framework": "MITRE ATLAS", "technique": {"id": "AML.T0018"}}
BATCH_ROWS = 256
JITTER = 0.1
MAX_BACKOFF = 10.0
"""Longest wait between replays while the model does not answer: a restarted model is checked promptly."""
WAIT_ALERT_AFTER = 60.0
"""Seconds without a first canary verdict before the guard logs an error saying it stays not ready."""
WAIT_ALERT_EVERY = 600.0
REFUSED_FOR = 30.0
"""Seconds a model that has had a verdict may refuse its canaries (HTTP 4xx) before that is a violation: long
enough for a model reload's brief 404s, short enough that a swapped model cannot keep its old passing verdict by
refusing the canaries it would fail."""
REFUSED_ATTEMPTS = 3
"""...and at least this many replays in a row refused (a single slow replay is not 30 s of refusals)."""
"""Then the error repeats this often (bounded log volume) until the first verdict comes in."""
_ALL_MODELS = "*"


def _identities(files: Sequence[Path]) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for f in files:
        for p in (f, f.parent / ARRAY_FILE):
            try:
                st = os.stat(p)
            except OSError:
                out.append((str(p), -1, -1, -1))
                continue
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class IntegrityChecker(Integrity):
    """Implements the ``Integrity`` seam of ``guard_agent.contracts``: 1.0 while the model behind the guard
    fails a check."""

    score_names = frozenset({"integrity.canary"})

    def __init__(self, state: GuardState, *, canary_path: str | None, sets: Sequence[CanarySet],
                 model_dir: str | None, public_key_path: str | None, rng: random.Random | None = None) -> None:
        self._state = state
        self._canary_path = canary_path
        self._model_dir = model_dir
        self._public_key_path = public_key_path
        self._rng = rng or random.Random()
        self._sets = group_by_model(sets)
        self._canary_ids = _identities(canary_files(canary_path)) if canary_path else ()
        self._passing: dict[str, bool] = {}
        self._unreachable: set[str] = set()
        self._signature_ok: bool | None = None
        self._snapshot: frozenset[Any] | None = None
        self._last_verify = 0.0
        self._first_verdicts = not self._sets  # readiness latch: every model with canaries has had a verdict
        self._errors: dict[str, str] = {}  # why a model's last replay got no answer (cleared by a verdict)
        self._refused: dict[str, tuple[float, int]] = {}  # model -> (monotonic first refusal, refusals in a row)
        self.refused_for = REFUSED_FOR
        self._attempts = 0  # replays tried before the first verdicts (for /readyz and the still-waiting error)
        self._started = time.monotonic()
        self._next_wait_alert = 0.0  # monotonic seconds since start before which no still-waiting error
        self.wait_alert_after = WAIT_ALERT_AFTER
        self.wait_alert_every = WAIT_ALERT_EVERY
        self._wake: asyncio.Event | None = None
        self.metrics = IntegrityMetrics(state.metrics.registry)
        self._publish_sets()

    # -- the request path -------------------------------------------------------------------------------------

    def score(self, model: str | None) -> float | None:
        """1.0 = failed, 0.0 = passing, None = not checked (yet) for this model. A dict lookup, no I/O."""
        if self._signature_ok is False:
            return 1.0
        key = model
        if key not in self._sets and model is None and len(self._sets) == 1:
            key = next(iter(self._sets))  # routes that name no model (MLflow, custom) in front of one model
        passing = self._passing.get(key) if key is not None else None
        if passing is False:
            return 1.0
        if passing or self._signature_ok:
            return 0.0
        return None

    @property
    def ready(self) -> bool:
        """False until every model with canaries has its first verdict (pass or fail), then True for good.

        ``/readyz`` waits for it: before the first replay the guard cannot tell a tampered model from a good
        one, so traffic should not be routed to it yet. Later reloads and outages do not unset it (a failing or
        unreachable model is answered by the policy and the upstream check, not by dropping out of the Service).
        """
        return self._first_verdicts

    def waiting_reason(self) -> str | None:
        """Why ``ready`` is still False, for the ``/readyz`` body; None once ready. Safe to show: model names,
        counts and the upstream's error status, never canary data."""
        if self._first_verdicts:
            return None
        pending = sorted(m for m in self._sets if m not in self._passing)
        elapsed = time.monotonic() - self._started
        text = (f"waiting for the first canary verdict of model(s) {', '.join(map(repr, pending))} "
                f"({self._attempts} replay(s) in {elapsed:.0f} s)")
        errors = [f"{m}: {self._errors[m]}" for m in pending if m in self._errors]
        if errors:
            return f"{text}; no answer, retrying: {'; '.join(errors)}"
        return f"{text}; replay in progress" if self._attempts == 0 else text

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._sets)

    @property
    def revisions(self) -> dict[str, list[str]]:
        return {m: [cs.revision for cs in sets] for m, sets in self._sets.items()}

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Verify the signed files before serving, then run the canary and watch loops until cleanup."""
        self._wake = asyncio.Event()
        self._started = time.monotonic()
        if self._model_dir:
            await self.verify_signature("start")
        tasks = [asyncio.create_task(self._watch_loop(), name="integrity-watch")]
        if self._sets:
            tasks.append(asyncio.create_task(self._canary_loop(), name="integrity-canaries"))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _canary_loop(self) -> None:
        backoff = 0.25
        while True:
            assert self._wake is not None
            self._wake.clear()
            try:
                answered = await self.check_canaries()
            except Exception as exc:  # a bug here must not end the checks for the life of the process
                self._state.events.log("error", "integrity: canary check failed unexpectedly",
                                       error={"message": f"{type(exc).__name__}: {exc}"})
                answered = False
            if not self._first_verdicts:
                self._attempts += 1
                self._alert_still_waiting()
            interval = self._state.settings.canary_interval
            if answered:
                delay, backoff = interval * self._rng.uniform(1 - JITTER, 1 + JITTER), 0.25
            else:
                delay, backoff = min(interval, backoff), min(interval, MAX_BACKOFF, backoff * 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._state.settings.reload_interval)
            try:
                if self._canary_path:
                    self.maybe_reload_canaries()
                if self._model_dir:
                    snapshot = await asyncio.to_thread(directory_snapshot, self._model_dir)
                    if snapshot != self._snapshot:
                        await self.verify_signature("change")
                    elif time.monotonic() - self._last_verify >= self._state.settings.canary_interval:
                        await self.verify_signature("periodic")
            except Exception as exc:
                self._state.events.log("error", "integrity: watch failed unexpectedly",
                                       error={"message": f"{type(exc).__name__}: {exc}"})

    # -- canaries ---------------------------------------------------------------------------------------------

    async def check_canaries(self) -> bool:
        """Replay every model's sets once; False when some model could not be asked (retry soon)."""
        answered = True
        for model, sets in list(self._sets.items()):
            verdict, results, error = await self._check_model(model, sets)
            if self._sets.get(model) is not sets:
                continue  # the sets were reloaded meanwhile: this verdict is about sets no longer active
            if verdict is not None:
                self._refused.pop(model, None)
            elif error is not None and self._refused_too_long(model, error):
                verdict = False
                results = [*results, CanaryResult(revision=sets[0].revision, checked=0, differed=0,
                                                  label_mismatches=0, max_probability_diff=0.0,
                                                  reason=f"the model refuses its canaries ({error})")]
            if verdict is None:
                answered = False
                self._record_unreachable(model, str(error) if error is not None else "no answer")
            else:
                self._record_verdict(model, verdict, results)
        return answered

    def _refused_too_long(self, model: str, error: UpstreamError) -> bool:
        """True once a model that has had a verdict has refused its canaries (HTTP 4xx) for ``refused_for``
        seconds and REFUSED_ATTEMPTS replays in a row. Before the first verdict a refusal only keeps the guard not
        ready (fail closed); an outage (no answer, 5xx, 408, 429) never counts: the last verdict stays."""
        if not error.refused or model not in self._passing:
            self._refused.pop(model, None)
            return False
        now = time.monotonic()
        since, count = self._refused.get(model, (now, 0))
        self._refused[model] = (since, count + 1)
        return count + 1 >= REFUSED_ATTEMPTS and now - since >= self.refused_for

    async def _ask(self, cs: CanarySet) -> Answer:
        assert self._state.client is not None
        labels: list[np.ndarray] = []
        probs: list[np.ndarray] = []
        for start in range(0, cs.count, BATCH_ROWS):
            answer = await infer(self._state.client, self._state.settings.upstream, cs.model,
                                 cs.inputs[start:start + BATCH_ROWS], protocol=cs.protocol,
                                 input_name=cs.input_name, datatype=cs.datatype, outputs=cs.outputs,
                                 timeout=self._state.settings.read_timeout)
            if not answer.readable:
                return answer
            if answer.labels is not None:
                labels.append(answer.labels)
            if answer.probabilities is not None:
                probs.append(answer.probabilities)
        n_chunks = -(-cs.count // BATCH_ROWS)
        return Answer(np.concatenate(labels) if len(labels) == n_chunks else None,
                      np.concatenate(probs) if len(probs) == n_chunks else None, readable=True)

    async def _check_model(self, model: str, sets: Sequence[CanarySet]
                           ) -> tuple[bool | None, list[CanaryResult], UpstreamError | None]:
        results: list[CanaryResult] = []
        for cs in sets:
            try:
                answer = await self._ask(cs)
                metadata = None
                if cs.metadata is not None:
                    metadata = await fetch_metadata(self._state.client, self._state.settings.upstream,  # type: ignore[arg-type]
                                                    cs.model, protocol=cs.protocol,
                                                    timeout=self._state.settings.read_timeout)
            except UpstreamError as exc:
                return None, results, exc
            result = compare_answers(cs, answer.labels, answer.probabilities)
            if not answer.readable:
                result = dataclasses.replace(result, reason="the model's answer could not be read")
            changed = metadata_changes(cs.metadata, metadata)
            if changed:
                result = dataclasses.replace(result, metadata_changed=changed)
            results.append(result)
            if result.ok:
                return True, results, None
        return False, results, None

    def _alert_still_waiting(self) -> None:
        """Log an error when the first verdict is overdue, then every ``wait_alert_every`` seconds: the guard
        stays not ready (fail closed) for as long as the canaries cannot be replayed, and someone should know."""
        elapsed = time.monotonic() - self._started
        if elapsed < max(self.wait_alert_after, self._next_wait_alert):
            return
        self._next_wait_alert = elapsed + self.wait_alert_every
        self._state.events.log("error", "integrity: still no canary verdict, the guard stays not ready (/readyz 503) "
                                        "until the model answers its canaries",
                               guard={"check": "canary", "models": sorted(m for m in self._sets
                                                                          if m not in self._passing),
                                      "attempts": self._attempts, "waited_seconds": round(elapsed, 1),
                                      "errors": dict(self._errors)})

    def _record_unreachable(self, model: str, error: str) -> None:
        self._errors[model] = error[:200]
        self.metrics.checks.labels("canary", "error").inc()
        if model not in self._unreachable:
            self._unreachable.add(model)
            self._state.events.log("warning", "integrity: cannot replay canaries, the model did not answer; "
                                              "retrying (the last verdict stays)",
                                   guard={"model": model, "check": "canary"}, error={"message": error[:300]})

    def _record_verdict(self, model: str, passing: bool, results: list[CanaryResult]) -> None:
        self._unreachable.discard(model)
        self._errors.pop(model, None)
        previous = self._passing.get(model)
        self._passing[model] = passing
        self._latch_ready()
        m = self.metrics
        m.last_check.labels("canary").set(time.time())
        best = results[-1] if passing else min(results, key=lambda r: (r.differed, len(r.metadata_changed)))
        canary_bad = best.differed > 0 or best.reason is not None
        m.failing.labels("canary", model).set(1 if canary_bad else 0)
        m.failing.labels("metadata", model).set(1 if best.metadata_changed else 0)
        m.canary_mismatches.labels(model).set(best.differed)
        m.checks.labels("canary", "pass" if passing else "fail").inc()
        if passing:
            if previous is False:
                self._state.events.log("info", f"model integrity restored: {model} answers its canaries again",
                                       ecs_event={"category": ["intrusion_detection"], "action": "integrity_restored",
                                                  "outcome": "success"},
                                       rule={"name": INTEGRITY_RULE},
                                       guard={"model": model, "check": "canary",
                                              "canary_set_revision": best.revision})
            return
        check = "canary" if canary_bad else "metadata"
        if previous is not False:
            m.violations.labels(check).inc()
        differed = [r.as_dict() for r in results]
        summary = (best.reason if best.reason is not None and best.differed == 0
                   else f"{best.differed} of {best.checked} canaries differ" if canary_bad
                   else f"metadata changed: {', '.join(best.metadata_changed)}")
        self._alert("error" if previous is not False else "warning",
                    f"model integrity violation: {model} ({summary})",
                    {"model": model, "check": check, "canary_set_revision": best.revision,
                     "canaries": best.as_dict(), "canary_sets": differed,
                     "on_violation": self._on_violation(model)})

    def _latch_ready(self) -> None:
        if not self._first_verdicts and all(m in self._passing for m in self._sets):
            self._first_verdicts = True
            self._state.events.log("info", "integrity: first canary verdicts in, ready",
                                   guard={"check": "canary", "models": sorted(self._sets)})

    def _on_violation(self, model: str | None) -> str:
        return str(self._state.policies.current.for_model(model).integrity_action)

    def _alert(self, level: str, message: str, guard: Mapping[str, Any]) -> None:
        self._state.events.log(level, message, ecs_event=dict(ALERT), rule={"name": INTEGRITY_RULE},
                               threat=THREAT, guard=dict(guard))

    def maybe_reload_canaries(self) -> bool:
        """Reload when a canary file changed: validate all, swap, keep the last good sets on error."""
        assert self._canary_path is not None
        ids = _identities(canary_files(self._canary_path))
        if ids == self._canary_ids:
            return False
        before = self.revisions
        try:
            sets = load_canary_dir(self._canary_path)
        except CanaryError as exc:
            self._canary_ids = ids  # do not retry until the files change again
            self.metrics.reloads.labels("failed").inc()
            self._state.events.log("error", "canary set rejected, the last good set stays active",
                                   ecs_event={"outcome": "failure"}, guard={"canary_sets": before},
                                   error={"message": str(exc)})
            return False
        self._canary_ids = ids
        self._sets = group_by_model(sets)
        for gone in set(self._passing) - set(self._sets):
            del self._passing[gone]
            self._unreachable.discard(gone)
        for gone in set(self._errors) - set(self._sets):
            del self._errors[gone]
            for labels in (("canary", gone), ("metadata", gone)):  # a removed model's alert must not stay at 1
                with contextlib.suppress(KeyError):
                    self.metrics.failing.remove(*labels)
            with contextlib.suppress(KeyError):
                self.metrics.canary_mismatches.remove(gone)
        self._publish_sets()
        self._latch_ready()  # the models still waiting for a first verdict may have been removed
        self.metrics.reloads.labels("ok").inc()
        self._state.events.log("info", "canary set reloaded", guard={"canary_sets": self.revisions,
                                                                     "previous": before})
        if self._wake is not None:
            self._wake.set()  # check the new sets now, not an interval later
        return True

    def _publish_sets(self) -> None:
        self.metrics.canary_sets.clear()
        for model, sets in self._sets.items():
            for cs in sets:
                self.metrics.canary_sets.labels(model, cs.revision).set(1)

    # -- signed files -----------------------------------------------------------------------------------------

    async def verify_signature(self, trigger: str) -> VerifyReport:
        """Verify the model directory against its signed manifest, off the event loop."""
        assert self._model_dir is not None
        assert self._public_key_path is not None
        self._snapshot = await asyncio.to_thread(directory_snapshot, self._model_dir)
        self._last_verify = time.monotonic()
        try:
            public = load_public_key(self._public_key_path)
        except SigningError as exc:
            report = VerifyReport(False, (Problem("public_key_invalid", None, str(exc)),), 0, None)
        else:
            report = await asyncio.to_thread(verify_directory, self._model_dir, public)
        previous = self._signature_ok
        self._signature_ok = report.ok
        m = self.metrics
        m.last_check.labels("signature").set(time.time())
        m.failing.labels("signature", _ALL_MODELS).set(0 if report.ok else 1)
        m.checks.labels("signature", "pass" if report.ok else "fail").inc()
        if report.ok:
            if previous is False:
                self._state.events.log("info", "model integrity restored: the model files match their signature",
                                       ecs_event={"category": ["intrusion_detection"], "action": "integrity_restored",
                                                  "outcome": "success"},
                                       rule={"name": INTEGRITY_RULE},
                                       guard={"check": "signature", "model_dir": self._model_dir,
                                              "key_id": report.key_id, "files": report.files})
            elif previous is None:
                self._state.events.log("info", "model files verified against their signed manifest",
                                       guard={"check": "signature", "model_dir": self._model_dir,
                                              "key_id": report.key_id, "files": report.files})
            return report
        if previous is not False:
            m.violations.labels("signature").inc()
        names = ", ".join(f"{p.kind} {p.path}" if p.path else p.kind for p in report.problems[:5])
        self._alert("error" if previous is not False else "warning",
                    f"model integrity violation: signed model files ({names})",
                    {"model": None, "check": "signature", "model_dir": self._model_dir, "key_id": report.key_id,
                     "trigger": trigger, "problems": [p.as_dict() for p in report.problems[:50]],
                     "problem_count": len(report.problems), "on_violation": self._on_violation(None)})
        return report


def make_integrity(state: GuardState) -> IntegrityChecker | None:
    """The checker for the configured canaries and/or signed model directory; None when neither is set."""
    s = state.settings
    if not s.canaries and not s.model_dir:
        return None
    sets: tuple[CanarySet, ...] = ()
    if s.canaries:
        try:
            sets = load_canary_dir(s.canaries)
        except CanaryError as exc:
            raise ConfigError(f"canaries: {exc}") from exc
    if s.model_dir:
        if not s.model_public_key_file:
            raise ConfigError("model_dir needs model_public_key_file (GUARD_MODEL_PUBLIC_KEY_FILE) to verify it")
        if not Path(s.model_dir).is_dir():
            raise ConfigError(f"model_dir {s.model_dir!r} is not a directory")
        try:
            load_public_key(s.model_public_key_file)
        except SigningError as exc:
            raise ConfigError(f"model_public_key_file: {exc}") from exc
    checker = IntegrityChecker(state, canary_path=s.canaries, sets=sets, model_dir=s.model_dir,
                               public_key_path=s.model_public_key_file)
    state.events.log("info", "integrity checks configured",
                     guard={"canary_sets": checker.revisions, "canary_interval": s.canary_interval,
                            "model_dir": s.model_dir})
    return checker
