"""A guard that cannot bind one of its ports fails with the error and leaves nothing half started."""

from __future__ import annotations

import errno
import socket

import pytest

from guard_agent.app import build_state
from guard_agent.events import CallbackSink
from guard_agent.server import start_listeners
from guard_agent.settings import Settings
from tests._support.servers import free_port


async def test_admin_port_in_use_releases_the_guard_port() -> None:
    """The admin port is taken after the guard port was bound: start_listeners raises EADDRINUSE and the guard
    port is free again (the half-started runner was cleaned up, not left listening)."""
    guard_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        settings = Settings(listen=f"127.0.0.1:{guard_port}", admin_listen=f"127.0.0.1:{admin_port}",
                            upstream="http://127.0.0.1:9", hmac_key="k")
        state = build_state(settings, sink=CallbackSink(lambda _line: None))
        with pytest.raises(OSError, match="address already in use") as caught:
            await start_listeners(state)
        assert caught.value.errno == errno.EADDRINUSE
    with socket.socket() as again:
        again.bind(("127.0.0.1", guard_port))  # raises if the guard still listened on it
