"""One service lifecycle for both services: start -> ready -> run -> ordered, bounded stop.

1. The listeners are bound here, on sockets we open ourselves, so a port in use is one
   clear line and exit code 3, not a traceback after a "listening" banner.
2. The service is entered (outbox or store open, transport started; the broker may
   still be away: a gateway must take webhooks while its uplink is down).
3. What startup built is frozen for the garbage collector (``bridge.service.heap``);
   ``READY=1`` to systemd (and the watchdog starts pinging); "listening" is logged.
4. Until SIGTERM/SIGINT (handled here and nowhere else, from before step 2 on, so a stop
   while starting is orderly; SIGHUP reloads, e.g. the API keys), a listener fails, or
   one of the service's background loops crashes (its ``TaskSet`` escalates).
5. ``STOPPING=1``; open streams (SSE) are ended so they cannot hold the shutdown; the
   listeners stop accepting and finish in-flight requests within a grace period; then
   the service's own exit drains what it can, publishes ``offline`` and closes.

Exit codes (the CLI returns them): 0 clean stop, 1 configuration error, 2 usage error,
3 cannot bind or the outbox is locked, 4 a listener or background loop failed (stopped in
order; systemd's Restart=on-failure starts it again, RestartPreventExitStatus is 1 2).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from bridge.errors import ConfigError, FleetError, OutboxError, OutboxLockedError
from bridge.service.heap import settle_after_startup
from bridge.service.sdnotify import Notifier, Watchdog
from bridge.service.taskset import TaskSet

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE",
           "BindError", "Listener", "run_main", "serve_service"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3  # cannot bind, or another instance holds the outbox
EXIT_FAILED = 4  # a listener or a background loop failed while running: restart

class BindError(FleetError):
    """A listener's address is in use or not ours to bind (exit code 3)."""

    def __init__(self, name: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} for the {name}: {reason}")
        self.host, self.port = host, port


@dataclass
class Listener:
    """One HTTP listener: a name for the logs, the address, and its uvicorn server."""

    name: str
    host: str
    port: int
    server: uvicorn.Server
    #: SO_REUSEPORT: processes of the same user that all set it share the port, and the
    #: kernel spreads new connections between them (replicas on one host); a process
    #: without it still gets "address in use".
    reuse_port: bool = False
    sock: socket.socket | None = field(default=None, repr=False)

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise BindError(self.name, self.host, self.port, exc.strerror or str(exc)) from None
        sock.listen(2048)
        sock.set_inheritable(True)
        self.sock = sock
        self.port = sock.getsockname()[1]

    async def serve(self) -> None:
        assert self.sock is not None
        await self.server.serve(sockets=[self.sock])


async def serve_service(
    service: AbstractAsyncContextManager[Any],
    listeners: Callable[[], list[Listener]],
    *,
    notifier: Notifier,
    watchdog: Watchdog,
    status: Callable[[], str],
    end_streams: Callable[[], None] = lambda: None,
    reload: Callable[[], object] | None = None,
    on_ready: Callable[[], None] = lambda: None,
    tasks: TaskSet | None = None,
) -> None:
    """Run ``service`` behind ``listeners`` until a signal; BindError if one cannot bind,
    FleetError if a listener fails or a task of ``tasks`` (the service's loops) crashes
    while running. ``reload`` runs on SIGHUP, ``on_ready`` once every listener serves
    (the demo's banner)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    async def serve(listener: Listener) -> None:
        try:
            await listener.serve()
        except (Exception, SystemExit) as exc:  # uvicorn exits on a failed startup
            failed.append(exc)
        stop.set()  # one listener ending stops the service

    async def until_crash(loops: TaskSet) -> None:
        await loops.failed.wait()
        log.error("stopping: %s task %s crashed", loops.owner,
                  loops.crashed[0] if loops.crashed else "?")
        stop.set()

    async def until_ready(servers: list[Listener]) -> None:
        for s in servers:
            await s.server.ready.wait()  # type: ignore[attr-defined]
        for s in servers:
            log.info("%s listening on %s:%d", s.name, s.host, s.port)
        on_ready()
        settle_after_startup()
        notifier.ready(status())
        await watchdog.run()

    # Before the listeners are bound, so before anyone can connect: a stop while the
    # service starts (the callback server waits up to 5 s for its subscription) is an
    # orderly one once it has started, not a kill. Handled only after the bind, a SIGTERM
    # sent as soon as the port answered killed the process on a loaded host.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        # Bound before the service starts: a port in use stops us before anything (the
        # broker's `online` presence included) has happened.
        servers = listeners()
        try:
            for listener in servers:
                listener.bind()
        except BindError:
            for listener in servers:
                if listener.sock is not None:
                    listener.sock.close()
            raise
        async with service, asyncio.TaskGroup() as group:
            for s in servers:
                group.create_task(serve(s), name=f"http-{s.name}")
            ready = group.create_task(until_ready(servers), name="ready-and-watchdog")
            watch = group.create_task(until_crash(tasks), name="crash-watch") \
                if tasks is not None else None
            await stop.wait()
            log.info("stopping")
            ready.cancel()
            if watch is not None:
                watch.cancel()
            notifier.stopping()
            end_streams()  # SSE responses end now instead of holding a listener open
            for s in servers:
                s.server.should_exit = True  # stop accepting; finish within the grace
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    notifier.close()
    if failed:
        raise FleetError(f"a listener failed: {failed[0]!r}") from failed[0]
    if tasks is not None and tasks.crashed is not None:
        name, exc = tasks.crashed
        raise FleetError(f"background task {name} crashed: {exc!r}") from exc


def run_main(prog: str, main: Coroutine[Any, Any, None]) -> int:
    """Run a service's main coroutine (on uvloop) and turn how it ended into the exit code
    and one line on stderr: no operator mistake ends in a traceback."""
    from bridge.service.event_loop import run

    try:
        run(main)
    except (BindError, OutboxLockedError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (ConfigError, OutboxError) as exc:  # found only when a part starts
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except FleetError as exc:  # a listener or loop failed; logged with its traceback
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
