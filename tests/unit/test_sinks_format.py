"""Wire formats: RFC 5424 header fields and octet counting, HTTP bodies, and the sink status lines."""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from guard_agent.events import CallbackSink
from guard_agent.sinks import Alarm, HttpSinkConfig, encode_batch, format_rfc5424, frame

HEADER = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) - ")


def event(**fields: Any) -> bytes:
    base: dict[str, Any] = {"@timestamp": "2026-03-01T12:00:00.123456Z", "log": {"level": "info"},
                            "event": {"kind": "event", "action": "allow"}, "message": "allow POST /infer"}
    base.update(fields)
    return orjson.dumps(base)


def fmt(line: bytes, facility: int = 16) -> bytes:
    return format_rfc5424(line, facility=facility, hostname="pod-1", app_name="inference-guard", procid="42")


class TestRfc5424:
    def test_header_fields(self) -> None:
        """PRI = facility*8+severity, the event's own timestamp, host, app, procid, MSGID = action, no SD."""
        msg = fmt(event())
        m = HEADER.match(msg)
        assert m is not None
        assert m.groups() == (b"134", b"2026-03-01T12:00:00.123456Z", b"pod-1", b"inference-guard", b"42", b"allow")
        assert msg.endswith(event())

    def test_severity_follows_level_and_alerts(self) -> None:
        """error -> 3, an alert at info level -> 4 (warning), debug -> 7."""
        def severity(line: bytes) -> int:
            m = HEADER.match(fmt(line, facility=0))
            assert m is not None
            return int(m.group(1))
        assert severity(event(log={"level": "error"})) == 3
        assert severity(event(event={"kind": "alert", "action": "block"})) == 4
        assert severity(event(log={"level": "debug"})) == 7

    def test_not_json_or_odd_fields_still_valid(self) -> None:
        """A non-JSON line or a bad timestamp/action yields a valid header (current time, MSGID '-' or cleaned)."""
        for line in (b"plain text", event(**{"@timestamp": "yesterday"}),
                     event(event={"action": "a b\u00e9c" * 20})):
            m = HEADER.match(fmt(line))
            assert m is not None
            assert re.match(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", m.group(2))
            assert 1 <= len(m.group(6)) <= 32 and b" " not in m.group(6)

    @given(st.binary(min_size=1, max_size=300))
    def test_octet_counting_matches_bytes(self, payload: bytes) -> None:
        """MSG-LEN is the byte length (not characters), so any payload can be framed and split again."""
        framed = frame(fmt(payload)) + frame(fmt(b"next"))
        length, _, rest = framed.partition(b" ")
        first, tail = rest[:int(length)], rest[int(length):]
        assert first.endswith(payload)
        assert tail.split(b" ", 1)[1].endswith(b"next")


def http_config(fmt_name: str, **extra: Any) -> HttpSinkConfig:
    return HttpSinkConfig(name="h", spool_dir="/x", url="http://h/x", format=fmt_name, **extra)


class TestHttpBodies:
    def test_ndjson(self) -> None:
        """ndjson: the event lines as they are, newline-terminated."""
        assert encode_batch(http_config("ndjson"), [b'{"a":1}', b'{"b":2}']) == b'{"a":1}\n{"b":2}\n'

    def test_splunk_hec(self) -> None:
        """HEC: one {time, source, sourcetype, index, event} object per event; time from @timestamp."""
        body = encode_batch(http_config("splunk_hec", index="security"), [event(), b"not json"])
        first, second = (orjson.loads(chunk) for chunk in body.split(b"\n"))
        assert first["event"] == orjson.loads(event())
        assert first["time"] == 1772366400.123456 and first["index"] == "security"
        assert first["sourcetype"] == "_json" and first["source"] == "inference-guard"
        assert "time" not in second and second["event"] == {"message": "not json"}

    def test_elastic_bulk_ids_are_stable(self) -> None:
        """Bulk: create actions whose _id depends only on the event, so a resend maps to the same document."""
        config = http_config("elastic_bulk", index="guard-events")
        body = encode_batch(config, [event(), event(message="other")])
        actions = [orjson.loads(line) for line in body.splitlines()[::2]]
        assert all(a["create"]["_index"] == "guard-events" for a in actions)
        assert actions[0]["create"]["_id"] != actions[1]["create"]["_id"]
        assert encode_batch(config, [event()]) == body.split(b"\n", 2)[0] + b"\n" + event() + b"\n"


class TestAlarm:
    def test_drops_are_announced_at_once_then_summarised(self) -> None:
        """The first loss is written immediately; later losses in the interval are summed and flushed."""
        lines: list[dict[str, Any]] = []
        alarm = Alarm(CallbackSink(lambda line: lines.append(orjson.loads(line))), drop_interval=60)
        alarm.dropped("siem", "spool_full", 1)
        alarm.dropped("siem", "spool_full", 5)
        alarm.dropped("siem", "spool_full", 7)
        assert [e["guard"]["dropped"] for e in lines] == [1]
        alarm.flush()
        assert [e["guard"]["dropped"] for e in lines] == [1, 12]
        assert all(e["log"]["level"] == "error" and e["event"]["action"] == "sink_events_dropped" for e in lines)
        assert lines[0]["message"] == "sink siem: 1 events dropped (spool_full)"

    def test_a_burst_that_stopped_is_still_announced(self) -> None:
        """Drops held back by the interval are written by tick() once the interval has passed."""
        lines: list[dict[str, Any]] = []
        alarm = Alarm(CallbackSink(lambda line: lines.append(orjson.loads(line))), drop_interval=0.05)
        alarm.dropped("siem", "queue_full", 1)
        alarm.dropped("siem", "queue_full", 3)
        alarm.tick()
        assert [e["guard"]["dropped"] for e in lines] == [1]
        time.sleep(0.06)
        alarm.tick()
        alarm.tick()
        assert [e["guard"]["dropped"] for e in lines] == [1, 3]

    def test_status_lines_follow_the_log_level_but_losses_always_show(self) -> None:
        """With log_level=warning an info status line is not written; a drop announcement (error) is."""
        lines: list[dict[str, Any]] = []
        alarm = Alarm(CallbackSink(lambda line: lines.append(orjson.loads(line))), min_level="warning")
        alarm.emit("info", "sink s delivering again", "sink_up", sink="s")
        alarm.dropped("s", "spool_full", 2)
        assert [e["event"]["action"] for e in lines] == ["sink_events_dropped"]

