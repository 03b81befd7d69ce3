"""The CLI as a first-time user runs it: mistakes in a policy, a port already taken, the help texts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard_agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


class TestCheckThresholds:
    @pytest.mark.parametrize(("test", "value"), [("gte", "-1"), ("gte", "95"), ("lt", "1.5"), ("gt", "-0.1")])
    def test_score_threshold_outside_unit_interval_refused(self, tmp_path: Path, test: str, value: str) -> None:
        """A threshold on a [0, 1] score outside [0, 1] (fires on everything or on nothing) fails `check` with
        file:line and the field."""
        policy = tmp_path / "p.yaml"
        policy.write_text(f"version: 1\nrules:\n  - id: r\n    action: block\n    when:\n"
                          f"      session.prada: {{{test}: {value}}}\n")
        r = cli("check", str(policy))
        assert r.returncode == 1, r.stdout
        assert f"{policy}:6: rules[0].when.session.prada.{test}: scores lie in [0, 1]" in r.stderr

    def test_thresholds_inside_unit_interval_accepted(self, tmp_path: Path) -> None:
        """The control: 0, 1 and 0.999 are thresholds, and a count property may exceed 1."""
        policy = tmp_path / "p.yaml"
        policy.write_text("version: 1\nrules:\n  - id: r\n    action: flag\n    when:\n"
                          "      ood.combined: {gte: 0.999, lte: 1}\n      session.prada: {gt: 0}\n"
                          "      request.rows: {gt: 95}\n")
        r = cli("check", str(policy))
        assert r.returncode == 0, r.stderr


class TestPortTaken:
    @pytest.mark.parametrize("which", ["GUARD_LISTEN", "GUARD_ADMIN_LISTEN"])
    def test_port_in_use_exits_at_once_naming_the_address(self, tmp_path: Path, which: str) -> None:
        """`run` with its guard or admin port taken prints one line naming the address and exits non-zero within a
        second of starting to listen, with no traceback."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            env = {"GUARD_LISTEN": f"127.0.0.1:{free_port()}", "GUARD_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
                   "GUARD_UPSTREAM": "http://127.0.0.1:9", "GUARD_HMAC_KEY": "k", which: address}
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "guard_agent.cli", "run"], cwd=ROOT,
                                    env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            try:
                out, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                out, err = proc.communicate()
                pytest.fail(f"still running after 20 s; stderr: {err[-2000:]}")
        assert proc.returncode == 2
        assert time.monotonic() - started < 15
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines == [f"guard-agent run: cannot listen on {address}: address already in use"], err
        assert "Traceback" not in out + err


class TestStdoutIsJson:
    async def test_client_aborts_leave_only_json_lines(self, tmp_path: Path) -> None:
        """Clients that close mid-body: each gets one `client_closed` event (status 499), and stdout holds JSON
        objects only (no traceback, no warning text), stderr nothing."""
        import asyncio

        from tests._support.servers import spawn_guard, wait_http_ready

        port, admin = free_port(), free_port()
        env = {**os.environ, "GUARD_LISTEN": f"127.0.0.1:{port}", "GUARD_ADMIN_LISTEN": f"127.0.0.1:{admin}",
               "GUARD_UPSTREAM": "http://127.0.0.1:9", "GUARD_HMAC_KEY": "k"}
        proc = spawn_guard(env, tmp_path / "out", tmp_path / "err")
        try:
            await wait_http_ready(f"http://127.0.0.1:{admin}/livez", lambda: proc.poll() is None)
            for i in range(3):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"POST /v2/models/m/infer HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                             f"X-Request-Id: gone{i}\r\nContent-Length: 1000\r\n\r\n{{\"inputs\":".encode())
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.close()
            await asyncio.sleep(1.0)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        import orjson

        lines = (tmp_path / "out").read_bytes().splitlines()
        events = [orjson.loads(line) for line in lines]  # raises on any line that is not JSON
        assert all(isinstance(e, dict) for e in events)
        assert any(e["message"] == "the model server at http://127.0.0.1:9 is not reachable: requests get 502 "
                   "until it is" and e["log"]["level"] == "warning" for e in events)  # said at start (item 16)
        gone = [e for e in events if e.get("rule", {}).get("name") == "client_closed"]
        assert len(gone) == 3 and {e["http"]["response"]["status_code"] for e in gone} == {499}
        assert (tmp_path / "err").read_text() == ""

    def test_warnings_and_library_errors_become_events(self) -> None:
        """A numpy RuntimeWarning and a library's logged traceback become one JSON event each, without the
        traceback or the exception's message (which may quote client bytes)."""
        code = (
            "import logging, numpy as np\n"
            "from guard_agent.events import CallbackSink, DiagnosticsHandler, EventLogger\n"
            "DiagnosticsHandler(EventLogger(CallbackSink(lambda l: print(l.decode())))).install()\n"
            "np.float32(3e38) * np.float32(10)\n"
            "try:\n    raise ValueError('X-API-Key: secret-key')\n"
            "except ValueError:\n    logging.getLogger('aiohttp.server').exception('Error handling request')\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
        import orjson

        events = [orjson.loads(line) for line in r.stdout.splitlines()]
        assert [e["message"] for e in events] == ["RuntimeWarning: overflow encountered in scalar multiply",
                                                  "Error handling request"]
        assert events[1]["error"] == {"logger": "aiohttp.server", "type": "ValueError"}
        assert "secret" not in r.stdout and r.stderr == ""


@pytest.mark.slow
class TestPackaging:
    def test_build_has_no_license_deprecation(self, tmp_path: Path) -> None:
        """Building the package (as every install does) prints no SetuptoolsDeprecationWarning about
        ``project.license``: it is an SPDX string, not a TOML table."""
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "project.license" not in r.stdout + r.stderr
        assert "SetuptoolsDeprecationWarning" not in r.stdout + r.stderr


class TestTestCommand:
    def test_ci_runs_the_readme_command_and_it_installs_system_packages(self) -> None:
        """`.ci/run` is the README's command (`scripts/test.sh`) and nothing else, and that command itself checks
        for (and as root installs) the system packages the suite needs, so a new user runs what CI runs."""
        ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
        assert ci[-1] == "scripts/test.sh" and not any("apt-get" in line for line in ci)
        script = (ROOT / "scripts/test.sh").read_text()
        for package in ("redis-server", "chromium", "rsyslog-gnutls"):
            assert package in script
        assert "apt-get install" in script
        assert "scripts/test.sh" in (ROOT / "README.md").read_text()


class TestHelpAndDocs:
    COMMANDS = ("run", "check", "fit", "demo", "canary", "sign", "replay", "tune", "report", "selftest")

    @pytest.mark.parametrize("command", COMMANDS)
    def test_every_subcommand_help_opens_with_what_it_does(self, command: str) -> None:
        """`guard-agent X --help` has a description (a sentence after the usage lines), not only options."""
        r = cli(command, "--help")
        assert r.returncode == 0
        after_usage = r.stdout.split("\n\n", 1)[1].lstrip()
        assert not after_usage.startswith(("options:", "positional arguments:")), r.stdout[:400]
        assert after_usage[0].isupper()

    def test_run_help_lists_env_names_defaults_and_where_the_rest_lives(self) -> None:
        """`run --help` names each flag's GUARD_* variable and default, and points at the other settings."""
        text = " ".join(cli("run", "--help").stdout.split())
        for env, default in (("GUARD_LISTEN", "0.0.0.0:8080"), ("GUARD_ADMIN_LISTEN", "0.0.0.0:9090"),
                             ("GUARD_UPSTREAM", "http://127.0.0.1:8081"), ("GUARD_POLICY", "built-in policy"),
                             ("GUARD_PROFILE", "none"), ("GUARD_REDIS_URL", "in memory"),
                             ("GUARD_LOG_SAMPLE_ALLOW", "1.0")):
            assert f"({env}; default" in text and default in text, env
        assert "Configuration section" in text and "GUARD_HMAC_KEY" in text

    def test_check_help_says_what_it_checks(self) -> None:
        text = " ".join(cli("check", "--help").stdout.split())
        assert "Validate policy files" in text and "thresholds" in text and "file:line" in text

    @pytest.mark.parametrize(("text", "line"), [
        ("version: 1\nmode: enforce\nrules:\n  - id: a\n    action block\n    when: {request.rows: {gt: 1}}\n", 5),
        ("version: 1\nmode: \"enforce\nrules: []\n", 2),
        ("version: 1\nrules:\n  - id: a\n    when: {request.rows: {gt: 1}\n    action: block\n", 4),
        ("version: 1\nrate_limit:\n  requests_per_second: 5\n burst: 3\n", 4),
    ])
    def test_yaml_syntax_error_points_at_the_real_line(self, tmp_path: Path, text: str, line: int) -> None:
        """A missing ':', an unclosed quote or flow mapping is reported at the line to fix, not lines later."""
        policy = tmp_path / "p.yaml"
        policy.write_text(text)
        r = cli("check", str(policy))
        assert r.returncode == 1
        assert r.stderr.startswith(f"error: {policy}:{line}: invalid YAML"), r.stderr

    def test_readme_check_sample_matches_what_check_prints(self) -> None:
        """The README's sample `check` output is what the command prints for the shipped example."""
        printed = cli("check", "examples/policy.yaml").stdout.strip()
        assert printed in (ROOT / "README.md").read_text()
