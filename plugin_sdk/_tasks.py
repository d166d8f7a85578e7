"""One owner for a long-running object's background tasks, and loops that survive their errors.

The runtime, the registry service and the agent each run a few loops (heartbeats, deadline
watchdog, KV watcher, sweeper, supervision). Each object keeps them in one :class:`TaskOwner`,
which starts them, notices one that ends by surprise (logged at ERROR, with its traceback, and
handed to the owner's ``on_failure``: the object decides whether that stops it), and at close
cancels and awaits every one. :func:`every` is the loop most of them are: a step run at an
interval whose unexpected error is logged (bounded) and does not end the loop.

Why not ``asyncio.TaskGroup``: these objects are started and stopped by ``start()``/``stop()``
calls (and ``async with``), not inside one ``async with`` block of their caller, and a TaskGroup
reports a failed child only when its block exits. A task that dies must be seen when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ._logs import BoundedLog

__all__ = ["TaskOwner", "every"]


class TaskOwner:
    """Start, watch and finally cancel the background tasks of ``owner`` (a name for the logs)."""

    def __init__(self, owner: str, log: logging.Logger, *,
                 on_failure: Callable[[str, BaseException], None] | None = None) -> None:
        self.owner = owner
        self._log = log
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failure: tuple[str, BaseException] | None = None  # the first task that died, and why

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this owner keeps until it ends or :meth:`close`."""
        task = asyncio.create_task(coro, name=f"{self.owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self._log.error("%s died: %s: %s", task.get_name(), type(exc).__name__, exc, exc_info=exc)
        if self.failure is None:
            self.failure = (task.get_name(), exc)
        if self._on_failure is not None:
            self._on_failure(task.get_name(), exc)

    async def cancel(self, task: asyncio.Task[Any] | None) -> None:
        """Cancel one of this owner's tasks and wait until it has ended."""
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(self) -> None:
        """Cancel every task and wait for each to end; safe to call twice."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task  # (an exception of its own was logged by _ended)
        self._tasks.clear()


async def every(interval: float, step: Callable[[], Awaitable[None]], *, log: logging.Logger,
                what: str) -> None:
    """Run ``step`` every ``interval`` seconds, forever. An Exception it raises is logged (at most a
    few lines per burst) and the loop goes on: one bad round must not end heartbeats or sweeps."""
    errors = BoundedLog(log, burst=3, period=60.0)
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except Exception as exc:  # logged, and the next round tries again: the loop must not end
            errors.warning("%s failed (it will run again in %gs): %s: %s", what, interval, type(exc).__name__,
                           exc, exc_info=log.isEnabledFor(logging.DEBUG))
