"""Every subcommand fails the same way (one line naming it, exit 2) and offers --json where it prints data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard_agent.cli import main

MACHINE_READABLE = (("check",), ("replay",), ("tune",), ("selftest",), ("explain",), ("status",), ("sign",),
                    ("canary", "check"))


class TestCliConvention:
    @pytest.mark.parametrize(("argv", "prog", "fragment"), [
        (["replay"], "guard-agent replay", "--capture"),
        (["check", "--nope", "p.yaml"], "guard-agent check", "unrecognized arguments: --nope"),
        (["canary", "check", "--upstream", "http://x"], "guard-agent canary check", "--canaries"),
        (["fit", "--out", "x"], "guard-agent fit", "--data"),
    ])
    def test_usage_errors_are_one_line_exit_2(self, argv: list[str], prog: str, fragment: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        """argparse's own errors: exit 2, one stderr line starting with the (sub)command, no usage block."""
        try:
            status = main(argv)
        except SystemExit as exited:
            status = exited.code  # type: ignore[assignment]
        assert status == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"{prog}: ") and fragment in err, err

    @pytest.mark.parametrize("command", ["replay", "tune", "report"])
    def test_configuration_errors_are_one_line_exit_2(self, command: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
        """A capture that does not exist: exit 2, ``guard-agent COMMAND: ...`` on one line, nothing on stdout."""
        missing = str(tmp_path / "nowhere")
        extra = {"replay": ["--policy", "p.yaml"], "tune": [], "report": ["--out", str(tmp_path / "r.html")]}
        assert main([command, "--capture", missing, *extra[command]]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err == f"guard-agent {command}: no such capture file or directory: {missing}\n"

    def test_check_json_reports_each_policy(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``check --json``: one JSON list (ok with revision, or the error), exit 1 when any policy fails."""
        good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
        good.write_text("version: 1\nrules: []\n")
        bad.write_text("version: 1\nrules:\n  - id: r\n    action: explode\n")
        assert main(["check", "--json", str(good), str(bad)]) == 1
        out, err = capsys.readouterr()
        assert err == ""
        first, second = json.loads(out)
        assert first["ok"] is True and len(first["revision"]) == 64 and first["rules"] == 0
        assert second["ok"] is False and f"{bad}:4: rules[0].action" in second["error"]
        assert main(["check", "--json", str(good)]) == 0

    @pytest.mark.parametrize("names", MACHINE_READABLE)
    def test_machine_readable_commands_offer_json(self, names: tuple[str, ...],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """Each command whose result a script reads has ``--json``."""
        with pytest.raises(SystemExit) as exited:
            main([*names, "--help"])
        assert exited.value.code == 0
        assert "--json" in capsys.readouterr().out
