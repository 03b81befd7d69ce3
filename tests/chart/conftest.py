"""Fixtures for the chart and image tests: the real helm binary and cached renders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chart._tools import CI_VALUES, helm_template, parse_docs, tool_or_skip


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm v3 binary; the chart tests skip (saying why) only when it is absent."""
    return tool_or_skip("helm", "helm not installed: run scripts/install-helm.sh (CI does)")


@pytest.fixture(scope="session")
def render(helm: str) -> Callable[..., list[dict[str, Any]]]:
    """Render the chart (cached per argument set) and parse the documents."""
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = {}

    def _render(
        *values: Path, sets: tuple[str, ...] = (), kube_version: str = "1.31.0"
    ) -> list[dict[str, Any]]:
        key = (values, sets, kube_version)
        if key not in cache:
            proc = helm_template(helm, values=values, sets=sets, kube_version=kube_version)
            cache[key] = parse_docs(proc.stdout)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def standalone(render: Callable[..., list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The standalone CI variant, rendered."""
    return render(next(p for p in CI_VALUES if p.name == "standalone-values.yaml"))
