"""systemd's notify protocol and watchdog, without a dependency: datagrams to $NOTIFY_SOCKET.

``Type=notify`` units learn readiness from ``READY=1`` (so "started" means the listener is
bound and the outbox or store is open, not "forked"), show ``STATUS=`` in
``systemctl status``, and with ``WatchdogSec=`` restart a service whose ``WATCHDOG=1``
pings stop. The pings here are sent only while the event loop runs *and* every critical
loop (publisher, batch writer, the MQTT network loop) has stamped a heartbeat recently;
each loop stamps at least every ``BEAT_SECONDS`` even when idle or offline, so idle or
offline is not "wedged", but a loop stuck inside a call is. Outside systemd (no
$NOTIFY_SOCKET) everything here is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["BEAT_SECONDS", "Notifier", "Watchdog"]

log = logging.getLogger(__name__)

#: A critical loop stamps its heartbeat at least this often, busy or idle.
BEAT_SECONDS = 2.0


class Notifier:
    """Sends ``KEY=value`` lines to systemd; returns False (and does nothing) outside it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace (a leading NUL byte).
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: systemd's WatchdogSec= in seconds, or None when no watchdog is asked for.
        self.watchdog_seconds = int(usec) / 1e6 if wanted else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # systemd gone or the socket unwritable: not fatal
            log.warning("systemd notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """Pings ``WATCHDOG=1`` every half ``WatchdogSec`` while every loop is alive.

    ``beat(name)`` returns the callable a loop calls on each iteration. A loop whose
    last stamp is older than ``WatchdogSec`` (or, without a watchdog, never checked) holds
    the pings back, and systemd restarts the service; the stale loops are logged.
    """

    def __init__(self, notifier: Notifier, status: Callable[[], str] | None = None) -> None:
        self.notifier = notifier
        self.status = status
        self._beats: dict[str, float] = {}
        self._watched: dict[str, Callable[[], float | None]] = {}
        self.pings = 0
        self._reported: frozenset[str] = frozenset()

    def beat(self, name: str) -> Callable[[], None]:
        self._beats[name] = time.monotonic()

        def stamp() -> None:
            self._beats[name] = time.monotonic()

        return stamp

    def watch(self, name: str, last: Callable[[], float | None]) -> None:
        """A loop that stamps its own monotonic time (a transport's network thread);
        None from ``last`` means the loop is not tracked."""
        self._watched[name] = last

    def stale(self, limit: float, now: float | None = None) -> list[str]:
        """Loops that have not stamped for ``limit`` seconds."""
        at = time.monotonic() if now is None else now
        beats = dict(self._beats)
        for name, last in self._watched.items():
            stamp = last()
            if stamp is not None:
                beats[name] = stamp
        return sorted(name for name, last in beats.items() if at - last > limit)

    async def run(self) -> None:
        """The pinger: runs until cancelled; returns at once when there is no watchdog."""
        timeout = self.notifier.watchdog_seconds
        if timeout is None:
            return
        interval = timeout / 2
        while True:
            await asyncio.sleep(interval)
            stale = self.stale(max(timeout, 2 * BEAT_SECONDS))
            if stale:
                if frozenset(stale) != self._reported:
                    log.error("watchdog: %s stopped making progress; not pinging systemd",
                              ", ".join(stale))
                self._reported = frozenset(stale)
                continue
            self._reported = frozenset()
            lines = ["WATCHDOG=1"]
            if self.status is not None:
                lines.append(f"STATUS={self.status()}")
            if self.notifier.send(*lines):
                self.pings += 1
