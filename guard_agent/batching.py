"""Row-wise work of concurrent requests done in one numpy call per event-loop turn.

numpy's per-call overhead dominates a one-row request: ``Profile.score`` costs 149 us of CPU for one row and
602 us for eight, the trackers' hashes 28 us and 57 us (digits, this project's shared 2-core machine). Requests
that reach the same step while the loop runs one turn's callbacks (typically the handlers of connections
that became readable together) wait for the end of that turn and are computed together, so under concurrent
load each pays for its rows and a share of one call; a request alone pays one extra future and callback.

Only for pure functions that treat rows independently (the result for a row does not depend on the other
rows of the call): results are then the same as computing each request alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

__all__ = ["TurnBatcher", "TurnQueue"]

K = TypeVar("K")  # hashable: requests are grouped by it
Item = TypeVar("Item")
G = TypeVar("G")  # a group of waiting entries
E = TypeVar("E")  # an entry: a request's rows or item
V = TypeVar("V")  # what its waiter gets
R = TypeVar("R")
T = TypeVar("T")


class _PerTurn(Generic[G, E, V]):
    """Entries waiting for the end of the current event-loop turn, by group; ``_run_groups`` serves them."""

    def __init__(self) -> None:
        self._waiting: dict[G, list[tuple[E, asyncio.Future[V]]]] = {}
        self._scheduled = False

    async def _wait(self, group: G, entry: E) -> V:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[V] = loop.create_future()
        self._waiting.setdefault(group, []).append((entry, done))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await done

    def _flush(self) -> None:
        self._scheduled = False
        groups, self._waiting = self._waiting, {}
        self._run_groups(groups)

    def _run_groups(self, groups: dict[G, list[tuple[E, asyncio.Future[V]]]]) -> None:
        raise NotImplementedError


class TurnBatcher(_PerTurn[tuple[K, int], np.ndarray, T], Generic[K, R, T]):
    """``await batcher(key, rows)`` = ``take(run(key, rows), 0, len(rows))``, batched per turn.

    ``run(key, X)`` computes over the rows of ``X``; ``take(result, start, end)`` is one request's share of a
    result (its rows ``start:end``). Requests are grouped by ``key`` and feature width, at most
    ``max_rows(key)`` rows a call; a request of that many rows or more runs alone. A batch whose call fails
    (one request's rows are not acceptable) is run again request by request, so each gets its own error.
    """

    def __init__(self, run: Callable[[K, np.ndarray], R], take: Callable[[R, int, int], T], *,
                 max_rows: Callable[[K], int]) -> None:
        super().__init__()
        self._run = run
        self._take = take
        self._max_rows = max_rows

    async def __call__(self, key: K, rows: np.ndarray) -> T:
        if rows.shape[0] >= self._max_rows(key):
            return self._take(self._run(key, rows), 0, rows.shape[0])
        return await self._wait((key, rows.shape[1]), rows)

    def _run_groups(self, groups: dict[tuple[K, int], list[tuple[np.ndarray, asyncio.Future[T]]]]) -> None:
        for (key, _), waiting in groups.items():
            limit = self._max_rows(key)
            chunk: list[tuple[np.ndarray, asyncio.Future[T]]] = []
            count = 0
            for item in waiting:
                if chunk and count + item[0].shape[0] > limit:
                    self._run_chunk(key, chunk)
                    chunk, count = [], 0
                chunk.append(item)
                count += item[0].shape[0]
            self._run_chunk(key, chunk)

    def _run_chunk(self, key: K, chunk: list[tuple[np.ndarray, asyncio.Future[T]]]) -> None:
        if len(chunk) > 1:
            try:
                result = self._run(key, np.concatenate([rows for rows, _ in chunk]))
            except Exception:  # noqa: S110 - run again one by one below: each request gets its own error
                pass
            else:
                start = 0
                for rows, done in chunk:
                    end = start + rows.shape[0]
                    if not done.done():  # a request cancelled meanwhile (client gone) takes nothing
                        done.set_result(self._take(result, start, end))
                    start = end
                return
        for rows, done in chunk:
            if done.done():
                continue
            try:
                done.set_result(self._take(self._run(key, rows), 0, rows.shape[0]))
            except Exception as exc:
                done.set_exception(exc)


class TurnQueue(_PerTurn[K, Item, R]):
    """``await queue(key, item)`` = ``run(key, [item])[0]``, the items of one event-loop turn run together.

    For work that is not row-wise (each item is a whole request, e.g. a session's tracker update): ``run(key,
    items)`` returns one result per item, in order. Items are grouped by ``key``. A call that fails is run again
    item by item, so each gets its own error. An item whose waiter was cancelled meanwhile still runs: the work
    may have effects (a session learning its query) that must not depend on the client waiting.
    """

    def __init__(self, run: Callable[[K, list[Item]], list[R]]) -> None:
        super().__init__()
        self._run = run

    async def __call__(self, key: K, item: Item) -> R:
        return await self._wait(key, item)

    def _run_groups(self, groups: dict[K, list[tuple[Item, asyncio.Future[R]]]]) -> None:
        for key, waiting in groups.items():
            if len(waiting) > 1:
                try:
                    results = self._run(key, [item for item, _ in waiting])
                except Exception:  # noqa: S110 - run again one by one below: each request gets its own error
                    pass
                else:
                    for (_, done), result in zip(waiting, results, strict=True):
                        if not done.done():  # cancelled meanwhile: nobody takes the result
                            done.set_result(result)
                    continue
            for item, done in waiting:
                try:
                    result = self._run(key, [item])[0]
                except Exception as exc:
                    if not done.done():
                        done.set_exception(exc)
                else:
                    if not done.done():
                        done.set_result(result)
