"""Polling for a condition that another task, thread or process makes true."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def wait_for(predicate: Callable[[], object | Awaitable[object]], timeout: float = 5.0,
                   interval: float = 0.05) -> bool:
    """True as soon as ``predicate()`` (plain or awaitable) is truthy, False once ``timeout`` seconds pass.

    Callers assert the result, so a condition that never holds fails the test instead of hanging it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(interval)
    return False
