"""The guard's decision path in-process, for the detection matrix (thousands of sessions in minutes).

``InProcessGuard`` builds the real guard state (``guard_agent.app.build_state``: the profile store, the
default policy compiled against every score the guard provides, the session trackers and the global
index, the in-memory session store) and runs a request through the steps ``guard_agent.proxy.inference``
runs after parsing, with the same objects and functions: the request's session records
(``guard_agent.proxy.sessions.RequestSessions``: the key's and, for a client sharing an address, the
address's; their buckets, blocks and trackers), the stateless profile scores (max over the rows), the
trackers' ``peek``, ``decide()``, the cool-down, the model call, the trackers' ``update`` and the hardening of
the answer.
Only HTTP, parsing and event writing are left out; ``tests/test_detection_matrix.py`` checks over real
HTTP that ``guard-agent run`` decides the same as this path for the same queries.

``MatrixClient`` is ``guard_agent.attacks.GuardClient`` with its transport replaced by this guard (or by
the bare model, for the unguarded baselines), so the attack code is the one the HTTP benches run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from guard_agent.app import build_state
from guard_agent.attacks import AttackBlocked, GuardClient
from guard_agent.identity import Identity
from guard_agent.policy.decide import RequestFacts, SessionFacts, decide
from guard_agent.policy.model import Decision
from guard_agent.protocols import parse_document, parse_request, read_response
from guard_agent.protocols.hardening import harden_document
from guard_agent.proxy.sessions import RequestSessions
from guard_agent.scoring import declared_schema_score
from guard_agent.settings import load_settings

__all__ = ["InProcessGuard", "MatrixClient", "Outcome"]

MODEL = "m"


class _Discard:
    """An event sink that drops every line (the matrix counts decisions itself)."""

    def write(self, line: bytes) -> bool:
        return True

    def close(self, timeout: float = 5.0) -> None:
        return None


@dataclass(frozen=True)
class Outcome:
    """One request's decision and what the client got back (None when refused)."""

    action: str
    rule: str
    status: int
    matched: tuple[str, ...]
    answer: bytes | None
    scores: dict[str, float]


def v2_answer(proba: np.ndarray) -> dict[str, Any]:
    """The model server's v2 answer for ``proba`` (MLServer's sklearn runtime with ``predict_proba``)."""
    return {"model_name": MODEL, "outputs": [{"name": "predict_proba", "shape": list(proba.shape),
                                              "datatype": "FP64", "data": proba.ravel().tolist()}]}


def v2_request(rows: np.ndarray) -> bytes:
    tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor], "outputs": [{"name": "predict_proba"}]})


class InProcessGuard:
    """The guard's state and decision path for one model (see the module docstring)."""

    def __init__(self, profile: str | None, predict_proba: Callable[[np.ndarray], np.ndarray], *,
                 policy: str | None = None, env: Mapping[str, str] | None = None) -> None:
        flags: dict[str, Any] = {"profile": profile, "policy": policy, "hmac_key": "detection-matrix-key-0123456789"}
        self.state = build_state(load_settings(env=dict(env or {}), flags=flags), sink=_Discard())
        self.predict_proba = predict_proba
        self._loop = asyncio.new_event_loop()
        self._profile = self.state.profile.profile_for(MODEL) if profile else None

    def close(self) -> None:
        self._loop.close()

    def row_scores(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """The profile's calibrated scores per row (pure: the live path takes their max over a request's rows)."""
        if self._profile is None:
            return {}
        return {k: np.asarray(v, dtype=np.float64) for k, v in self._profile.score(X).items()}

    def ask(self, session: str, rows: np.ndarray, now: float,
            row_scores: Mapping[str, np.ndarray] | None = None, proba: np.ndarray | None = None,
            address_session: str | None = None) -> Outcome:
        """One request of ``rows`` from ``session`` at time ``now``; ``row_scores`` (from ``row_scores``) and the
        model's answer ``proba`` may be precomputed for these rows (both are pure functions of the rows).
        ``address_session``: the client address's session, which an unverified key's requests count against
        too (``Identity.address_session``); None for a client with an address of its own."""
        return self._loop.run_until_complete(self._ask(session, rows, now, row_scores, proba, address_session))

    async def _ask(self, session: str, features: np.ndarray, now: float,
                   row_scores: Mapping[str, np.ndarray] | None, proba: np.ndarray | None,
                   address_session: str | None) -> Outcome:
        state = self.state
        eff = state.policies.current.for_model(MODEL)
        identity = Identity(session=session, source="header", ip=None, address_session=address_session)
        sessions = await RequestSessions.load(state.sessions, state.trackers, identity, now)
        rate_limited, retry_after = sessions.take(now, eff.rate_limit)
        request = RequestFacts(model=MODEL, protocol="v2", rows=features.shape[0], body_bytes=0,
                               features=features.shape[1])
        facts = SessionFacts(id=session, source="header", queries=sessions.queries,
                             age_seconds=now - sessions.record.first_seen, blocked_rule=sessions.blocked(now),
                             rate_limited=rate_limited, retry_after=retry_after)
        decision: Decision | None = None
        scores: dict[str, float] = {}
        if eff.mode == "enforce" and (facts.blocked_rule is not None or rate_limited):
            early = decide(request, scores, facts, eff)
            decision = early if early.refused else None
        if decision is None:
            per_row = self.row_scores(features) if row_scores is None else row_scores
            scores = {name: float(np.max(v)) for name, v in per_row.items()}
            scores["input.schema"] = max(scores.get("input.schema", 0.0),
                                         declared_schema_score(features, eff.input))
            if eff.needs_session_scores:
                scores.update(await sessions.peek(features, MODEL, now))
            decision = decide(request, scores, facts, eff)
        sessions.block(decision, eff, now)
        sessions.count(features.shape[0])
        if decision.refused:
            await sessions.save(now)
            status = 429 if decision.action == "throttle" else 403
            return Outcome(decision.action, decision.rule, status, decision.matched, None, scores)
        payload = orjson.dumps(v2_answer(self.predict_proba(features) if proba is None else proba))
        doc = read_response(payload)
        if eff.needs_session_scores:
            await sessions.learn(features, MODEL, parse_document("v2", doc, features.shape[0]), now, scores)
        if decision.action == "harden" and decision.hardening is not None:
            hardened = harden_document("v2", doc, decision.hardening)
            payload = hardened if hardened is not None else b""
        await sessions.save(now)
        return Outcome(decision.action, decision.rule, 200, decision.matched, payload, scores)


@dataclass
class MatrixClient(GuardClient):
    """``GuardClient`` whose requests go to an ``InProcessGuard`` (or, with ``guard=None``, straight to the
    model) on a simulated clock advancing ``pace`` seconds per request. ``new_key_after_block``: the
    persistent attacker, who opens a fresh key after every 403 (up to ``max_keys``). ``one_address``: every key
    is sent from one client address, so (the keys being unverified, as without a key store) each request also
    counts against that address's session; otherwise each key has an address of its own."""

    guard: InProcessGuard | None = None
    direct: Callable[[np.ndarray], np.ndarray] | None = None
    pace: float = 0.05
    clock: float = 0.0
    new_key_after_block: bool = False
    one_address: bool = False
    max_keys: int = 50
    first_block: int | None = None
    first_alert: int | None = None
    actions: dict[str, int] = field(default_factory=dict)
    _renamed: dict[str, str] = field(default_factory=dict)
    _opened: int = 0

    def __post_init__(self) -> None:
        self.url = "http://in-process:0"
        super().__post_init__()

    def _post(self, body: bytes, key: str, request_id: str) -> tuple[int, bytes]:
        self.clock += self.pace
        parsed = parse_request("v2", body, content_type="application/json", content_encoding=None)
        rows = parsed.features
        if self.guard is None:
            assert self.direct is not None
            return 200, orjson.dumps(v2_answer(self.direct(rows)))
        real = self._renamed.get(key, key)
        out = self.guard.ask(f"{self.run_id}:{real}", rows, self.clock,
                             address_session=f"{self.run_id}:address" if self.one_address else None)
        self.actions[out.action] = self.actions.get(out.action, 0) + rows.shape[0]
        if out.action != "allow" and self.first_alert is None:
            self.first_alert = self.sent + rows.shape[0]
        if out.status == 403:
            if self.first_block is None:
                self.first_block = self.sent + rows.shape[0]
            if self.new_key_after_block:
                self._opened += 1
                if self._opened >= self.max_keys:
                    raise AttackBlocked(f"{self.run_id}: {self.max_keys} keys blocked")
                self._renamed[key] = f"{key}~{self._opened}"
        return out.status, out.answer if out.answer is not None else b""
