"""Locating and running the real tools the chart tests use (helm, kubernetes-validate, hadolint).

Tools are looked up beside the running interpreter first (``scripts/install-helm.sh`` installs helm
into the virtualenv's bin) and then on PATH, so the tests work whether or not the venv is activated.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "inference-guard"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.29.0", "1.31.0")
# Kinds whose schemas come from CRDs: kubernetes-validate has none, so they are checked apart.
CRD_KINDS = frozenset({"ServiceMonitor", "PrometheusRule", "InferenceService"})


def find_tool(name: str) -> str | None:
    """The tool beside the interpreter (the venv), else on PATH, else None."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def tool_or_skip(name: str, reason: str) -> str:
    """The tool's path, or skip the calling test saying ``reason`` (how to install it) when it is absent."""
    path = find_tool(name)
    if path is None:
        pytest.skip(reason)
    return path


def run(
    cmd: Sequence[str], *, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on an unexpected failure the assertion shows its output."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=120)
    if check:
        shown = " ".join(cmd)
        assert proc.returncode == 0, f"{shown} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def helm_template(
    helm: str,
    *,
    chart: Path = CHART,
    values: Iterable[Path] = (),
    sets: Iterable[str] = (),
    kube_version: str = KUBE_VERSIONS[-1],
    check: bool = True,
    release: str = "demo",
) -> subprocess.CompletedProcess[str]:
    """``helm template`` with value files and --set pairs."""
    cmd = [helm, "template", release, str(chart), "--namespace", "models", "--kube-version", kube_version]
    for path in values:
        cmd += ["-f", str(path)]
    for pair in sets:
        cmd += ["--set", pair]
    return run(cmd, check=check)


def parse_docs(text: str) -> list[dict[str, Any]]:
    """Rendered multi-document YAML to a list of objects (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """All objects of one kind."""
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of a kind; fails if there are none or several."""
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec of the single Deployment."""
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """A container by name, from containers or initContainers."""
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container named {name!r}")
