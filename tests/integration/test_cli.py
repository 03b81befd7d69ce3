"""The CLI as a user runs it: check, demo, run with bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard_agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


class TestCheck:
    def test_check_ok(self) -> None:
        """`check` accepts the shipped example and exits 0."""
        r = cli("check", "examples/policy.yaml")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ok: examples/policy.yaml")

    def test_check_error_names_file_line_field(self, tmp_path: Path) -> None:
        """`check` exits 1 and prints file:line: field: message."""
        bad = tmp_path / "bad.yaml"
        bad.write_text("version: 1\nrules:\n  - id: x\n    action: explode\n    when: {request.rows: {gt: 1}}\n")
        r = cli("check", str(bad))
        assert r.returncode == 1
        assert f"{bad}:4: rules[0].action: expected one of" in r.stderr


class TestRun:
    def test_bad_setting_exits_2_with_message(self) -> None:
        """A bad GUARD_* setting stops `run` with a one-line error, not a traceback."""
        r = cli("run", env={"GUARD_UPSTREAM": "ftp://nope"}, timeout=30)
        assert r.returncode == 2
        assert "configuration error: upstream must be an http(s) URL" in r.stderr
        assert "Traceback" not in r.stderr

    def test_bad_first_policy_exits_2(self, tmp_path: Path) -> None:
        """A broken policy at start is refused with file/line/field."""
        bad = tmp_path / "p.yaml"
        bad.write_text("version: 3\n")
        r = cli("run", "--policy", str(bad), timeout=30)
        assert r.returncode == 2
        assert "p.yaml:1: version: unsupported policy version" in r.stderr


@pytest.mark.slow
class TestDemo:
    def test_demo_decides_and_exits_within_a_minute(self) -> None:
        """`guard-agent demo` exits 0 within a minute and its table shows benign traffic allowed and attacks stopped."""
        t0 = time.monotonic()
        r = cli("demo", timeout=90)
        assert r.returncode == 0, r.stderr[-3000:]
        assert time.monotonic() - t0 < 60
        rows = {line[:50].strip(): line[50:].split() for line in r.stdout.splitlines() if "  " in line[:52]}
        benign = rows["benign client: held-out digits"]
        assert benign[:6] == ["100", "0", "0", "0", "0", "0"]
        assert rows["model-management call (unload)"][5] == "1"
        assert int(rows["black-box attack (near-duplicate probing)"][4]) >= 1
        assert int(rows["model extraction (synthetic queries)"][4]) >= 1
        assert int(rows["request flood from one key"][3]) >= 1
        assert rows["benign client: support tickets (text)"][:6] == ["60", "0", "0", "0", "0", "0"]
        assert int(rows["character-edit attack on tickets (text)"][4]) >= 1
