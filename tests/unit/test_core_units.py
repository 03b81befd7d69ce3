"""Settings precedence, session identity, token bucket, the memory session store, event rendering."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from guard_agent.events import EventLogger, StreamSink, build_decision_event
from guard_agent.identity import IdentityResolver, client_address
from guard_agent.ratelimit import take
from guard_agent.sessions.memory import MemorySessionStore
from guard_agent.settings import ConfigError, load_settings


class TestSettings:
    def test_precedence_flags_env_file_defaults(self, tmp_path: Path) -> None:
        """flags > GUARD_* env > config file > defaults."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("listen: 127.0.0.1:1111\nupstream: http://127.0.0.1:2222\nread_timeout: 5\n")
        s = load_settings(cfg, env={"GUARD_UPSTREAM": "http://127.0.0.1:3333"}, flags={"read_timeout": 7})
        assert s.listen == "127.0.0.1:1111"
        assert s.upstream == "http://127.0.0.1:3333"
        assert s.read_timeout == 7.0
        assert s.admin_listen == "0.0.0.0:9090"

    def test_secret_from_file(self, tmp_path: Path) -> None:
        """GUARD_HMAC_KEY_FILE reads the key from a mounted Secret file."""
        (tmp_path / "k").write_text("s3cret\n")
        s = load_settings(env={"GUARD_HMAC_KEY_FILE": str(tmp_path / "k")})
        assert s.hmac_key == "s3cret"

    @pytest.mark.parametrize(("env", "fragment"), [
        ({"GUARD_LISTEN": "nope"}, "HOST:PORT"),
        ({"GUARD_UPSTREAM": "ftp://x"}, "http(s) URL"),
        ({"GUARD_TRUSTED_PROXIES": "10.0.0.0/33"}, "trusted_proxies"),
        ({"GUARD_REDIS_URL": "redis://127.0.0.1:6379/0"}, "hmac_key"),
        ({"GUARD_READ_TIMEOUT": "-1"}, "read_timeout must be positive"),
        ({"GUARD_MAX_BODY_BYTES": "lots"}, "max_body_bytes"),
    ])
    def test_bad_settings_are_clear_errors(self, env: dict[str, str], fragment: str) -> None:
        """A bad setting raises ConfigError naming it."""
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_settings(env=env)

    def test_unknown_key_in_file(self, tmp_path: Path) -> None:
        """A typo in the config file is refused, not ignored."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("upstreem: http://x\n")
        with pytest.raises(ConfigError, match="unknown setting 'upstreem'"):
            load_settings(cfg, env={})


    @pytest.mark.parametrize("text", [
        "upstream: http://127.0.0.1:1\nhmac_key: s3cret-SENTINEL-value: x\n",      # a mapping value on that line
        "hmac_key: 's3cret-SENTINEL-value\n",                                        # unterminated quote
    ])
    def test_config_syntax_errors_never_quote_the_file(self, tmp_path: Path, text: str) -> None:
        """A config file may hold secrets inline: a syntax error gives the problem and the line, no snippet."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        with pytest.raises(ConfigError, match="line") as info:
            load_settings(cfg, env={})
        assert "SENTINEL" not in str(info.value)

    def test_undecodable_secret_file_is_not_quoted(self, tmp_path: Path) -> None:
        """A secret file that is not UTF-8 is refused naming the setting, without its bytes."""
        (tmp_path / "k").write_bytes(b"s3cret-SENTINEL-\xff\xfe-value\n")
        with pytest.raises(ConfigError, match="hmac_key") as info:
            load_settings(env={"GUARD_HMAC_KEY_FILE": str(tmp_path / "k")})
        assert "SENTINEL" not in str(info.value) and "0xff" not in str(info.value)

    def test_bad_yaml_in_an_environment_setting_is_a_clear_error(self) -> None:
        """GUARD_SINKS / GUARD_ROUTES hold YAML (sinks may carry tokens): a syntax error there is a ConfigError
        naming the variable, without a snippet."""
        with pytest.raises(ConfigError, match="GUARD_SINKS") as info:
            load_settings(env={"GUARD_SINKS": "[{type: http, token: SENTINEL-token: x}]"})
        assert "SENTINEL" not in str(info.value)


class TestIdentity:
    def resolver(self, sources: tuple[str, ...] = ("header", "bearer", "address"),
                 trusted: tuple[str, ...] = ()) -> IdentityResolver:
        return IdentityResolver(key=b"k" * 32, header="X-API-Key", sources=sources, trusted_proxies=trusted)

    def test_sources_in_order(self) -> None:
        """API key first, then bearer token, then address; never the raw value."""
        r = self.resolver()
        a = r.resolve({"X-API-Key": "key-1", "Authorization": "Bearer tok"}, "10.0.0.1")
        b = r.resolve({"Authorization": "Bearer tok"}, "10.0.0.1")
        c = r.resolve({}, "10.0.0.1")
        assert (a.source, b.source, c.source) == ("header", "bearer", "address")
        assert len({a.session, b.session, c.session}) == 3
        assert "key-1" not in a.session and len(a.session) == 32

    def test_hash_depends_on_secret(self) -> None:
        """Replicas with the same secret agree; a different secret gives a different id."""
        other = IdentityResolver(key=b"x" * 32, header="X-API-Key", sources=("header",), trusted_proxies=())
        assert self.resolver().resolve({"X-API-Key": "k"}, None).session == \
            self.resolver().resolve({"X-API-Key": "k"}, None).session
        assert other.resolve({"X-API-Key": "k"}, None).session != \
            self.resolver().resolve({"X-API-Key": "k"}, None).session

    def test_forwarded_for_only_from_trusted_proxy(self) -> None:
        """X-Forwarded-For is believed only when the peer is a trusted proxy."""
        nets = [__import__("ipaddress").ip_network("10.0.0.0/8")]
        assert str(client_address("203.0.113.5", "1.2.3.4", nets)) == "203.0.113.5"
        assert str(client_address("10.1.1.1", "1.2.3.4", nets)) == "1.2.3.4"
        assert str(client_address("10.1.1.1", "1.2.3.4, 10.2.2.2", nets)) == "1.2.3.4"
        assert str(client_address("10.1.1.1", "garbage", nets)) == "10.1.1.1"


class TestTokenBucket:
    def test_burst_then_refill(self) -> None:
        """A bucket allows `burst` at once, then refills at `rate`."""
        b = None
        for _ in range(3):
            b, ok, _ = take(b, 0.0, rate=1.0, burst=3)
            assert ok
        b, ok, retry = take(b, 0.0, rate=1.0, burst=3)
        assert not ok and retry == pytest.approx(1.0)
        b, ok, _ = take(b, 1.0, rate=1.0, burst=3)
        assert ok


class TestMemoryStore:
    async def test_lru_bound_and_ttl(self) -> None:
        """The store never exceeds its bound and forgets sessions after the TTL."""
        evicted: list[str] = []
        store = MemorySessionStore(max_sessions=3, ttl=10, on_evict=evicted.append)
        for i in range(5):
            await store.get(f"s{i}", now=float(i))
        assert store.size() == 3
        assert evicted == ["capacity", "capacity"]
        rec = await store.get("s4", now=4.0)
        rec.queries = 7
        assert (await store.get("s4", now=5.0)).queries == 7
        assert (await store.get("s4", now=100.0)).queries == 0

    async def test_unblock_and_reset(self) -> None:
        """Operators can lift a block or forget a session."""
        store = MemorySessionStore()
        rec = await store.get("s", 0.0)
        rec.blocked_rule, rec.blocked_until = "r", 100.0
        assert rec.blocked(1.0) == "r"
        assert await store.unblock("s")
        assert rec.blocked(1.0) is None
        assert await store.delete("s")
        assert not await store.delete("s")


class TestEvents:
    def test_decision_event_shape(self) -> None:
        """Events are one JSON object per line with the ECS fields of DESIGN.md."""
        buf = io.BytesIO()
        sink = StreamSink(buf)
        log = EventLogger(sink)
        fields = build_decision_event(
            action="block", outcome="failure", rule="ood-block", mode="enforce", enforced=True, session="abc",
            model="digits", rows=2, scores={"ood.combined": 0.99999}, policy_revision="p" * 64,
            profile_revision=None, request_id="r1", method="POST", status=403, path="/v2/models/digits/infer",
            source_ip="127.0.0.1", technique="AML.T0015", started=0.0)
        log.decision(fields, "block POST /v2/models/digits/infer", level="warning")
        sink.close()
        line = buf.getvalue().splitlines()[0]
        e = orjson.loads(line)
        assert e["message"].startswith("block")
        assert e["event"]["kind"] == "alert" and e["event"]["action"] == "block"
        assert e["event"]["category"] == ["intrusion_detection"] and e["event"]["outcome"] == "failure"
        assert e["log"]["level"] == "warning" and e["@timestamp"].endswith("Z")
        assert e["rule"]["name"] == "ood-block"
        assert e["guard"]["scores"] == {"ood.combined": 0.99999}
        assert e["threat"] == {"framework": "MITRE ATLAS", "technique": {"id": "AML.T0015"}}
        assert e["http"]["response"]["status_code"] == 403 and e["source"]["ip"] == "127.0.0.1"

    def test_allow_sampling_never_drops_alerts(self) -> None:
        """With sampling at 0, allow events are dropped and alerts are still written."""
        lines: list[bytes] = []
        from guard_agent.events import CallbackSink

        log = EventLogger(CallbackSink(lines.append), sample_allow=0.0)
        assert not log.decision({"ecs_event": {"action": "allow"}}, "allow")
        assert log.decision({"ecs_event": {"action": "flag"}}, "flag")
        assert len(lines) == 1

    def test_full_queue_drops_and_counts(self) -> None:
        """A full queue drops the event and counts it instead of blocking the caller."""
        class Stuck(io.BytesIO):
            def write(self, b: bytes) -> int:  # type: ignore[override]
                import time
                time.sleep(0.5)
                return len(b)

        drops: list[int] = []
        sink = StreamSink(Stuck(), max_queue=1, on_drop=lambda: drops.append(1))
        results = [sink.write(b"x") for _ in range(50)]
        assert not all(results)
        assert drops
