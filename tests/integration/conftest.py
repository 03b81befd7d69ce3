"""Fixtures the integration tests share: a profile fitted on the digits data, Redis, upstream stubs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests._support.redis import RedisServer, delete_prefix, redis_cmd
from tests._support.servers import Handler, ServePost
from tests.conftest import DigitsData


@pytest.fixture(scope="session")
def digits_profile(tmp_path_factory: pytest.TempPathFactory, digits: DigitsData) -> str:
    """A profile with detectors and session trackers fitted on the digits training split (read-only)."""
    from detectors import fit_profile, save_profile
    from detectors.trackers import fit_tracker_config

    out = tmp_path_factory.mktemp("profile") / "digits"
    trackers = fit_tracker_config(digits.X_train, digits.y_train, seed=0).to_parts()
    save_profile(fit_profile(digits.X_train, labels=digits.y_train, fpr=0.01, seed=0,
                             extra_components={"trackers": trackers}), out)
    return str(out)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free port that a test may stop, pause and restart; always stopped after."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the shared Redis (127.0.0.1:6379), whose keys are deleted after the test."""
    try:
        assert redis_cmd(6379, "PING").startswith(b"+PONG")
    except OSError as exc:
        raise RuntimeError("these tests need the Redis server on 127.0.0.1:6379") from exc
    p = f"ig-test-{uuid.uuid4().hex[:12]}:"
    yield p
    delete_prefix(6379, p)


@pytest.fixture
def serve_post(aiohttp_server: Any) -> ServePost:
    """``await serve_post(path, handler)``: an upstream stub answering POST ``path`` with ``handler`` on a loopback
    port (pytest-aiohttp's test server, closed after the test); returns its base URL."""

    async def serve(path: str, handler: Handler) -> str:
        app = web.Application()
        app.router.add_post(path, handler)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}"

    return serve
