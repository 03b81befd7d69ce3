"""Per-request work done once: ids, timestamps and metric children give what the slow forms gave."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from guard_agent.events import _Timestamps, random_id
from guard_agent.metrics import LabelledCounter, LabelledHistogram, Metrics


class TestRandomId:
    def test_is_a_random_version_4_uuid(self) -> None:
        """32 lower-case hex digits that parse as an RFC 4122 version-4 UUID, all distinct."""
        ids = [random_id() for _ in range(5000)]
        assert len(set(ids)) == 5000
        for i in ids[:500]:
            u = uuid.UUID(hex=i)
            assert u.hex == i and u.version == 4 and u.variant == uuid.RFC_4122

    def test_every_random_bit_varies(self) -> None:
        """Apart from the 6 fixed version/variant bits, every bit takes both values."""
        seen_one, seen_zero = 0, 0
        for _ in range(2000):
            v = int(random_id(), 16)
            seen_one |= v
            seen_zero |= ~v
        fixed = (0xF000 << 64) | (0xC000 << 48)
        assert (seen_one & seen_zero & ((1 << 128) - 1)) | fixed == (1 << 128) - 1


    def test_threads_and_a_forked_child_never_repeat_an_id(self) -> None:
        """Ids read from per-thread buffers of random bytes: unique across threads, and a forked child (whose
        copy of the parent's buffer is dropped) does not repeat the ids its parent makes next."""
        import os
        import threading

        random_id()  # the parent holds unread bytes now
        got: list[list[str]] = [[] for _ in range(4)]
        threads = [threading.Thread(target=lambda out=out: out.extend(random_id() for _ in range(600))) for out in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen = [i for out in got for i in out]
        assert len(set(seen)) == len(seen) == 2400
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its next ids, then out
            os.close(read)
            os.write(write, "".join(random_id() for _ in range(20)).encode())
            os._exit(0)
        os.close(write)
        child = b""
        while chunk := os.read(read, 65536):
            child += chunk
        os.close(read)
        os.waitpid(pid, 0)
        child_ids = {child[i : i + 32].decode() for i in range(0, len(child), 32)}
        parent_ids = {random_id() for _ in range(20)}
        assert len(child_ids) == 20 and not child_ids & parent_ids


class TestTimestamps:
    def test_matches_isoformat_across_seconds(self) -> None:
        """Within a second and across second, minute and day boundaries, the text equals datetime's."""
        ts = _Timestamps()
        base = 1_764_460_799.0  # 2025-11-29T23:59:59Z
        for now in (base, base + 0.25, base + 0.999999, base + 1.0, base + 1.000001, base + 61.5, base - 3600.75):
            want = datetime.fromtimestamp(int(now), UTC).strftime("%Y-%m-%dT%H:%M:%S")
            got = ts(now)
            assert got.startswith(want + ".") and got.endswith("Z") and len(got) == len(want) + 8
            assert abs(int(got[-7:-1]) - (now - int(now)) * 1e6) <= 1


class TestMetricChildren:
    def test_each_app_counts_into_its_own_registry(self) -> None:
        """Two apps' metrics (as in tests running several guards) never share a count."""
        a, b = Metrics(), Metrics()
        for _ in range(3):
            a.requests.inc("v2", "allow", "200")
        b.requests.inc("v2", "allow", "200")
        b.scores.observe("ood.knn", 0.95)
        text_a, text_b = generate_latest(a.registry).decode(), generate_latest(b.registry).decode()
        line = 'inference_guard_requests_total{action="allow",route="v2",status="200"}'
        assert f"{line} 3.0" in text_a and f"{line} 1.0" in text_b
        assert 'inference_guard_score_count{score="ood.knn"} 1.0' in text_b
        assert 'score="ood.knn"' not in text_a


class TestLabelledCounter:
    def test_exposes_what_prometheus_client_exposes(self) -> None:
        """Same increments into prometheus_client's Counter and ours: the same exposition text, ``_created``
        aside (a clock reading), and one ``_created`` per series."""
        theirs_reg, ours_reg = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
        labels = ("route", "action", "status")
        theirs = Counter("inference_guard_requests_total", "Requests by route, decision and status", labels,
                         registry=theirs_reg)
        ours = LabelledCounter("inference_guard_requests_total", "Requests by route, decision and status", labels,
                               ours_reg)
        rng = random.Random(0)
        for _ in range(500):
            values = (rng.choice(("v2", "v1", "refused")), rng.choice(("allow", "block")), rng.choice(("200", "403")))
            theirs.labels(*values).inc()
            ours.inc(*values)

        def lines(reg: CollectorRegistry) -> list[str]:
            return [ln for ln in generate_latest(reg).decode().splitlines() if "_created{" not in ln]

        assert lines(ours_reg) == lines(theirs_reg)
        created = [ln for ln in generate_latest(ours_reg).decode().splitlines() if "_created{" in ln]
        assert len(created) == len([ln for ln in lines(ours_reg) if ln.startswith("inference_guard_requests_total{")])

    def test_sample_values_readable_from_the_registry(self) -> None:
        """Tests, the bench and the admin API read samples through the registry, as with prometheus_client's."""
        m = Metrics()
        m.requests.inc("v2", "allow", "200")
        m.requests.inc("v2", "allow", "200")
        get = m.registry.get_sample_value
        assert get("inference_guard_requests_total", {"route": "v2", "action": "allow", "status": "200"}) == 2.0


class TestLabelledHistogram:
    BUCKETS = (0.5, 0.9, 0.99, 0.999, 0.9999, 1.0)

    def test_exposes_what_prometheus_client_exposes(self) -> None:
        """Same values into prometheus_client's Histogram and ours: the same exposition text (bucket edges
        included, values exactly on a bound counted in that bucket), ``_created`` aside (a clock reading)."""
        theirs_reg, ours_reg = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
        theirs = Histogram("inference_guard_score", "Distribution of calibrated scores", ["score"],
                           buckets=self.BUCKETS, registry=theirs_reg)
        ours = LabelledHistogram("inference_guard_score", "Distribution of calibrated scores", self.BUCKETS, ours_reg,
                                 label="score")
        rng = random.Random(0)
        values = [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0, 0.50000001, 1.5] + [rng.random() for _ in range(500)]
        for value in values:
            for name in ("ood.knn", "session.risk"):
                theirs.labels(name).observe(value)
            ours.observe_all({"ood.knn": value, "session.risk": value})

        def lines(reg: CollectorRegistry) -> list[str]:
            return [ln for ln in generate_latest(reg).decode().splitlines() if "_created{" not in ln]

        assert lines(ours_reg) == lines(theirs_reg)
        text = generate_latest(ours_reg).decode()
        created = [ln for ln in text.splitlines() if ln.startswith("inference_guard_score_created{")]
        assert len(created) == 2

    def test_sample_values_readable_from_the_registry(self) -> None:
        """Tests and the admin API read samples through the registry, as with any prometheus_client metric."""
        m = Metrics()
        m.scores.observe_all({"ood.knn": 0.95, "ood.pca": 0.2})
        m.scores.observe("ood.knn", 0.3)
        get = m.registry.get_sample_value
        assert get("inference_guard_score_count", {"score": "ood.knn"}) == 2.0
        assert get("inference_guard_score_bucket", {"score": "ood.knn", "le": "0.9"}) == 1.0
        assert get("inference_guard_score_bucket", {"score": "ood.knn", "le": "0.99"}) == 2.0
        assert get("inference_guard_score_sum", {"score": "ood.pca"}) == 0.2

    def test_latency_histograms_expose_what_prometheus_client_exposes(self) -> None:
        """The overhead and upstream latency histograms (label ``route``): prometheus_client's text for the same
        observations, ``_created`` aside."""
        buckets = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        theirs_reg = CollectorRegistry(auto_describe=True)
        theirs = Histogram("inference_guard_overhead_seconds",
                           "Time spent in the guard per request, excluding the upstream call", ["route"],
                           buckets=buckets, registry=theirs_reg)
        m = Metrics()
        rng = random.Random(1)
        for value in [0.0, 0.0001, 0.00025, 10.0, 11.0] + [rng.random() / 100 for _ in range(300)]:
            for route in ("v2", "passthrough"):
                theirs.labels(route).observe(value)
                m.overhead.observe(route, value)

        def lines(text: str) -> list[str]:
            return [ln for ln in text.splitlines() if ln.startswith("inference_guard_overhead_seconds")
                    and "_created" not in ln]

        ours_text = generate_latest(m.registry).decode()
        assert lines(ours_text) == lines(generate_latest(theirs_reg).decode())
        assert "# TYPE inference_guard_overhead_seconds histogram" in ours_text


class TestSettleHeap:
    def test_freezes_start_up_and_raises_thresholds(self) -> None:
        """After ``settle_heap`` what exists is frozen (never walked again) and the collector runs less often."""
        import gc

        from guard_agent.server import GC_THRESHOLDS, settle_heap

        before = gc.get_threshold()
        try:
            settle_heap()
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold() == GC_THRESHOLDS
            assert GC_THRESHOLDS[0] > before[0]
        finally:
            gc.unfreeze()
            gc.set_threshold(*before)


class TestDecisionEventRendering:
    def test_same_bytes_as_the_structlog_chain(self) -> None:
        """``EventLogger.write`` renders a decision event as the structlog chain of ``log()`` does: same keys in
        the same order, same values (``@timestamp`` aside, a clock reading), at every level."""
        import time

        import orjson

        from guard_agent.events import CallbackSink, EventLogger, build_decision_event

        lines: list[bytes] = []
        logger = EventLogger(CallbackSink(lines.append))
        for technique, level in ((None, "info"), ("AML.T0024.002", "warning")):
            fields = build_decision_event(
                action="block" if technique else "allow", outcome="success", rule="r", mode="enforce",
                enforced=True, session="s", model="m", rows=1, scores={"ood.knn": 0.1234567891, "x": 1},
                policy_revision="p", profile_revision=None, request_id="id", method="POST", status=200,
                path="/v2/models/m/infer", source_ip="127.0.0.1", technique=technique, started=time.perf_counter(),
                extra_guard={"protocol": "v2", "matched_rules": ["a", "b"], "odd": object()})
            logger.write(fields, "allow POST /v2/models/m/infer", level=level)
            getattr(logger._log, level)("allow POST /v2/models/m/infer", **fields)  # the structlog chain
            fast, chain = orjson.loads(lines[-2]), orjson.loads(lines[-1])
            assert list(fast) == list(chain)
            fast.pop("@timestamp"), chain.pop("@timestamp")
            assert fast["guard"].pop("odd").startswith("<object object at")
            chain["guard"].pop("odd")
            assert fast == chain
