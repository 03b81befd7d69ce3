"""Per-request work done once: ids, timestamps and metric children give what the slow forms gave."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prometheus_client import generate_latest

from guard_agent.events import _Timestamps, random_id
from guard_agent.metrics import Metrics


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
        """Two apps' metrics (as in tests running several guards) never share a cached child."""
        a, b = Metrics(), Metrics()
        for _ in range(3):
            a.requests_by("v2", "allow", "200").inc()
        b.requests_by("v2", "allow", "200").inc()
        b.scores_by("ood.knn").observe(0.95)
        text_a, text_b = generate_latest(a.registry).decode(), generate_latest(b.registry).decode()
        line = 'inference_guard_requests_total{action="allow",route="v2",status="200"}'
        assert f"{line} 3.0" in text_a and f"{line} 1.0" in text_b
        assert 'inference_guard_score_count{score="ood.knn"} 1.0' in text_b
        assert 'score="ood.knn"' not in text_a
        assert a.requests_by("v2", "allow", "200") is a.requests.labels("v2", "allow", "200")
