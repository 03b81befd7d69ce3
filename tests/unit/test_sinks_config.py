"""Sink configuration: valid mappings become typed configs, every mistake is a ConfigError that names it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guard_agent.events import StreamSink
from guard_agent.metrics import Metrics
from guard_agent.settings import ConfigError, Settings, load_settings
from guard_agent.sinks import HttpSinkConfig, SyslogSinkConfig, make_sink, parse_sinks


@pytest.fixture
def token(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text("tok\n")
    return str(path)


def one(raw: dict[str, Any], spool: str = "/var/spool/guard") -> Any:
    (config,) = parse_sinks([raw], spool)
    return config


class TestParseSinks:
    def test_syslog_defaults(self) -> None:
        """A minimal syslog sink gets local0, the app name, bounded queue/spool and its own spool directory."""
        c = one({"type": "syslog", "host": "siem.example", "port": 6514})
        assert isinstance(c, SyslogSinkConfig)
        assert (c.name, c.facility, c.app_name, c.tls) == ("syslog-0", 16, "inference-guard", None)
        assert c.spool_dir == "/var/spool/guard/syslog-0"
        assert c.queue_size > 0 and c.spool_max_bytes > 0

    def test_http_formats_pick_their_token_scheme(self, token: str) -> None:
        """splunk_hec defaults to 'Splunk', elastic_bulk to 'ApiKey', ndjson to 'Bearer'; token read from file."""
        schemes = {}
        for fmt in ("splunk_hec", "elastic_bulk", "ndjson"):
            c = one({"type": "http", "name": fmt.replace("_", "-"), "url": "https://h.example/x", "format": fmt,
                     "token_file": token})
            assert isinstance(c, HttpSinkConfig) and c.read_token() == "tok"
            schemes[fmt] = c.token_scheme
        assert schemes == {"splunk_hec": "Splunk", "elastic_bulk": "ApiKey", "ndjson": "Bearer"}

    def test_token_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """token_env reads the variable; an empty one is a ConfigError at start, not a 401 later."""
        monkeypatch.setenv("HEC_TOKEN", "from-env")
        c = one({"type": "http", "url": "http://h/x", "token_env": "HEC_TOKEN"})
        assert c.read_token() == "from-env"
        monkeypatch.setenv("HEC_TOKEN", "")
        with pytest.raises(ConfigError, match="HEC_TOKEN"):
            one({"type": "http", "url": "http://h/x", "token_env": "HEC_TOKEN"})

    @pytest.mark.parametrize(("raw", "message"), [
        ({"type": "kafka"}, "type must be syslog or http"),
        ({"type": "syslog", "host": "h", "port": 514, "hots": 1}, "unknown key.*hots"),
        ({"type": "syslog", "port": 514}, "host is required"),
        ({"type": "syslog", "host": "h"}, "port is required"),
        ({"type": "syslog", "host": "h", "port": 70000}, "port must be"),
        ({"type": "syslog", "host": "h", "port": "514"}, "port must be an integer"),
        ({"type": "syslog", "host": "h", "port": 514, "facility": "local9"}, "facility"),
        ({"type": "syslog", "host": "h", "port": 514, "ca_file": "/x"}, "TLS is off"),
        ({"type": "syslog", "host": "h", "port": 514, "tls": "yes"}, "tls must be true or false"),
        ({"type": "syslog", "host": "h", "port": 514, "app_name": "a b"}, "app_name"),
        ({"type": "syslog", "host": "h", "port": 514, "retry_initial": 5, "retry_max": 1}, "retry_max"),
        ({"type": "syslog", "host": "h", "port": 514, "queue_size": 0}, "queue_size"),
        ({"type": "syslog", "host": "h", "port": 514, "name": "Bad Name"}, "name must be"),
        ({"type": "http", "url": "ftp://h/x"}, "http:// or https://"),
        ({"type": "http", "url": "https://user:pw@h/x"}, "must not carry credentials"),
        ({"type": "http", "url": "http://h/x", "token": "inline"}, "must not be written in the config"),
        ({"type": "http", "url": "http://h/x", "format": "gelf"}, "format must be one of"),
        ({"type": "http", "url": "http://h/x", "token_file": "/nonexistent/token"}, "not a readable file"),
        ({"type": "http", "url": "http://h/x", "headers": {"Authorization": "x"}}, "set by the sink"),
        ({"type": "http", "url": "https://h/x", "cert_file": "/etc/hostname"}, "must be given together"),
    ])
    def test_mistakes_are_named(self, raw: dict[str, Any], message: str) -> None:
        """Each invalid sink mapping raises ConfigError with a message saying what is wrong and where."""
        with pytest.raises(ConfigError, match=message) as info:
            parse_sinks([raw], "/spool")
        assert str(info.value).startswith("sinks[0]")

    def test_names_are_unique_and_spool_is_required(self) -> None:
        """Two sinks may not share a name (it is their spool directory); sinks without spool_dir are refused."""
        sink = {"type": "syslog", "name": "s", "host": "h", "port": 514}
        with pytest.raises(ConfigError, match="duplicate sink name"):
            parse_sinks([sink, sink], "/spool")
        with pytest.raises(ConfigError, match="spool_dir"):
            parse_sinks([sink], None)
        with pytest.raises(ConfigError, match="expected a mapping"):
            parse_sinks(["syslog://h:514"], "/spool")  # type: ignore[list-item]


class TestFromSettings:
    def test_guard_sinks_env_as_yaml(self, tmp_path: Path) -> None:
        """GUARD_SINKS (YAML) and GUARD_SPOOL_DIR reach make_sink; a bad sink there is a ConfigError at start."""
        env = {"GUARD_SINKS": "[{type: syslog, host: h, port: 514, facility: nope}]",
               "GUARD_SPOOL_DIR": str(tmp_path)}
        settings = load_settings(env=env)
        assert settings.sinks == ({"type": "syslog", "host": "h", "port": 514, "facility": "nope"},)
        with pytest.raises(ConfigError, match="facility"):
            make_sink(settings, Metrics())

    def test_no_sinks_means_plain_stdout(self) -> None:
        """Without sinks the guard keeps exactly the stdout StreamSink it always had."""
        sink = make_sink(Settings(), Metrics())
        try:
            assert isinstance(sink, StreamSink)
        finally:
            sink.close(1)

    def test_unwritable_spool_dir_is_a_config_error(self, tmp_path: Path) -> None:
        """A spool directory that cannot be created is reported at start with the sink's name."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        settings = Settings(sinks=({"type": "syslog", "name": "s", "host": "h", "port": 514},),
                            spool_dir=str(blocker))
        with pytest.raises(ConfigError, match="sink s: cannot use spool directory"):
            make_sink(settings, Metrics())

    def test_bad_ca_file_is_a_config_error(self, tmp_path: Path) -> None:
        """A CA file that is not a certificate fails at start, not at the first delivery."""
        bad = tmp_path / "ca.pem"
        bad.write_text("not a certificate")
        settings = Settings(sinks=({"type": "syslog", "name": "s", "host": "h", "port": 6514, "tls": True,
                                    "ca_file": str(bad)},), spool_dir=str(tmp_path / "spool"))
        with pytest.raises(ConfigError, match="TLS setup failed"):
            make_sink(settings, Metrics())


class TestExample:
    def test_example_config_validates(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """examples/sinks/guard-sinks.yaml is a valid config once its secret files exist."""
        import yaml

        example = Path(__file__).resolve().parents[2] / "examples" / "sinks" / "guard-sinks.yaml"
        assert len(load_settings(example, env={}).sinks) == 4   # valid as a guard-agent --config file
        doc = yaml.safe_load(example.read_text())
        existing = tmp_path / "secret"
        existing.write_text("value")
        for sink in doc["sinks"]:
            for key in [k for k in sink if k.endswith("_file")]:
                sink[key] = str(existing)
        monkeypatch.setenv("ELASTIC_API_KEY", "key")
        configs = parse_sinks(doc["sinks"], doc["spool_dir"])
        assert [(c.name, type(c).__name__) for c in configs] == [
            ("rsyslog", "SyslogSinkConfig"), ("splunk", "HttpSinkConfig"), ("elastic", "HttpSinkConfig"),
            ("vector", "HttpSinkConfig")]
        assert [getattr(c, "format", None) for c in configs] == [None, "splunk_hec", "elastic_bulk", "ndjson"]
        assert configs[3].token_header == "X-Guard-Token" and configs[3].token_scheme == ""
        assert all(c.spool_dir.startswith("/var/spool/inference-guard/") for c in configs)

