"""Background tasks: one ``TaskSet`` owns them, so none is lost, none dies silently, and
stopping is bounded and never raises.

The services' loops (writer, publisher, alerts, ...), the router's handler tasks, the
proxy's deliveries (each webhook subscription's worker), the webhooks' delivery workers
(:class:`Lanes`), a Server-Sent-Events response's disconnect watcher and the command
executor's running commands are each one TaskSet:

- every task is named (the name is what a crash log and a stuck shutdown show);
- a task that ends with an exception is logged with its traceback, and, in a set made
  with ``escalate=True`` (the services' loops), escalated: ``failed`` is set, on which
  ``bridge.service.lifecycle.serve_service`` stops the service in order and exits non-zero
  (code 4), so systemd restarts it instead of it running on without the loop;
- ``drain(seconds)`` lets running tasks finish within the bound, cancels the rest and
  waits for them; it never re-raises a task's exception, so whatever is closed after it
  (outbox, store, transport) is closed even when a loop died long before the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

__all__ = ["Lanes", "TaskSet", "cancel_and_wait", "within"]

log = logging.getLogger(__name__)


class TaskSet:
    """Named background tasks with one crash policy and one bounded stop."""

    def __init__(self, owner: str, *, escalate: bool = False) -> None:
        self.owner = owner
        self.escalate = escalate
        #: The first task that crashed (name, exception), kept for the exit message.
        self.crashed: tuple[str, BaseException] | None = None
        #: Set when a task of an escalating set crashes: the service must stop.
        self.failed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any] | Awaitable[Any],
              name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task named ``name``, owned by this set until it ends."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("%s task %s crashed", self.owner, task.get_name(), exc_info=exc)
        if self.escalate:
            if self.crashed is None:
                self.crashed = (task.get_name(), exc)
            self.failed.set()

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:  # an empty set is still a set: `if tasks:` asks for tasks
        return bool(self._tasks)

    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    async def wait(self) -> None:
        """Until every task (including those spawned meanwhile) has ended, unbounded."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def drain(self, seconds: float) -> int:
        """Let the tasks finish for at most ``seconds``, then cancel the rest and wait for
        them. Returns how many were cancelled; never raises a task's exception."""
        if self._tasks and seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.wait()
        cancelled = 0
        while self._tasks:  # a task may spawn another as it is cancelled
            pending = set(self._tasks)
            for task in pending:
                task.cancel()
            cancelled += len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks -= pending
        if cancelled and seconds > 0:
            log.warning("%s: cancelled %d task(s) still running after %gs at stop",
                        self.owner, cancelled, seconds)
        return cancelled

    async def cancel(self) -> None:
        """Cancel every task now and wait for them (``drain(0)``)."""
        await self.drain(0)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for each to finish, so none outlives its owner; a task
    that had already failed does not raise here (its owner logged it when it did)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def within(aw: Awaitable[object], seconds: float) -> bool:
    """Await ``aw`` for at most ``seconds``: True if it finished, False (it is cancelled)
    if the time ran out. Loops that the watchdog checks wait this way, so they come round
    to stamp their heartbeat even while there is nothing to do."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
    # that arrives as its timeout fires, and a loop waiting this way would then never stop.
    try:
        async with asyncio.timeout(seconds):
            await aw
    except TimeoutError:
        return False
    return True


_R = TypeVar("_R")
_I = TypeVar("_I")


class Lanes(Generic[_R, _I]):
    """One queue and one worker per receiver: a slow or failing receiver holds back only
    its own deliveries, which stay in order. The workers are one :class:`TaskSet` (named
    ``label``), so a worker that dies is logged and :meth:`close` stops them all."""

    def __init__(self, deliver: Callable[[_R, _I], Awaitable[object]], label: str) -> None:
        self._deliver = deliver
        self._label = label
        self._tasks = TaskSet(label)
        self._lanes: dict[str, tuple[asyncio.Queue[_I], asyncio.Task[Any]]] = {}
        self._busy = 0  # items taken off a queue whose delivery has not ended

    @property
    def pending(self) -> int:
        """Items not yet delivered: queued, or being delivered now."""
        return sum(q.qsize() for q, _ in self._lanes.values()) + self._busy

    def workers(self) -> list[str]:
        """The running workers' task names (``{label}-{key}``)."""
        return self._tasks.names()

    def put(self, key: str, receiver: _R, item: _I) -> None:
        entry = self._lanes.get(key)
        if entry is None or entry[1].done():
            queue: asyncio.Queue[_I] = asyncio.Queue()
            task = self._tasks.spawn(self._work(receiver, queue), f"{self._label}-{key}")
            entry = self._lanes[key] = (queue, task)
        entry[0].put_nowait(item)

    async def _work(self, receiver: _R, queue: asyncio.Queue[_I]) -> None:
        while True:
            item = await queue.get()
            self._busy += 1
            try:
                await self._deliver(receiver, item)
            except Exception:  # a bug must not stop this receiver's deliveries
                log.exception("%s delivery failed", self._label)
            finally:
                self._busy -= 1

    async def close(self) -> None:
        await self._tasks.cancel()
        self._lanes.clear()
