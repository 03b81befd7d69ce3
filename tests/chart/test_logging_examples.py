"""The log-shipper examples select the guard's container and parse the events the guard writes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pytest
import yaml

from tests.chart._tools import REPO

LOGGING = REPO / "examples" / "logging"


def _guard_line() -> dict[str, Any]:
    """One real line from the guard's event logger, as it would appear on stdout."""
    events = pytest.importorskip("guard_agent.events")
    lines: list[bytes] = []
    logger = events.EventLogger(events.CallbackSink(lines.append))
    logger.log("warning", "probe line", ecs_event={"kind": "alert"})
    logger.close()
    assert lines, "the event logger wrote nothing"
    parsed: dict[str, Any] = orjson.loads(lines[0])
    return parsed


class TestFluentBit:
    config = yaml.safe_load((LOGGING / "fluent-bit.yaml").read_text())

    def test_tails_only_guard_containers(self) -> None:
        """The tail input reads only files of containers named guard, with the CRI parser."""
        (tail,) = self.config["pipeline"]["inputs"]
        assert tail["path"].endswith("_guard-*.log")
        assert tail["multiline.parser"] == "cri"

    def test_parser_reads_the_guards_timestamp(self) -> None:
        """The JSON parser's time_format parses the @timestamp the guard really writes."""
        (parser,) = self.config["parsers"]
        assert parser["format"] == "json"
        line = _guard_line()
        fmt = parser["time_format"].replace("%L", "%f")
        assert datetime.strptime(line[parser["time_key"]], fmt).year >= 2024

    def test_alerts_route_on_event_kind(self) -> None:
        """Alerts are re-tagged on the event.kind field the guard sets, and only they go to the webhook."""
        rule = next(f for f in self.config["pipeline"]["filters"] if f["name"] == "rewrite_tag")["rule"]
        assert rule.startswith("$event['kind'] ^alert$")
        assert _guard_line()["event"]["kind"] == "alert"
        outputs = {o["name"]: o["match"] for o in self.config["pipeline"]["outputs"]}
        assert outputs == {"es": "guard.*", "http": "alert.*"}


class TestVector:
    config = yaml.safe_load((LOGGING / "vector.yaml").read_text())

    def test_keeps_only_guard_containers_and_parses_json(self) -> None:
        """The remap drops other containers and parses each line as JSON."""
        source = self.config["transforms"]["guard_events"]["source"]
        assert '.kubernetes.container_name != "guard"' in source
        assert "parse_json(.message)" in source
        assert self.config["transforms"]["guard_events"]["drop_on_abort"] is True

    def test_alert_route_and_sinks(self) -> None:
        """Every event goes to Elasticsearch; only the alert route feeds the SIEM sink."""
        assert self.config["transforms"]["guard_routes"]["route"]["alert"] == '.event.kind == "alert"'
        assert self.config["sinks"]["elasticsearch"]["inputs"] == ["guard_events"]
        assert self.config["sinks"]["siem_alerts"]["inputs"] == ["guard_routes.alert"]

    def test_no_credentials_in_the_files(self) -> None:
        """Credentials are environment references, never literals."""
        for name in ("vector.yaml", "fluent-bit.yaml"):
            text = (LOGGING / name).read_text()
            for line in text.splitlines():
                secretish = any(k in line.lower() for k in ("password", "passwd", "token", "authorization"))
                if secretish and ":" in line and not line.strip().startswith("#"):
                    assert "${" in line, line
