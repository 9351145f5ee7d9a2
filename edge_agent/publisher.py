"""Drains the outbox to the broker: QoS 1, a bounded in-flight window, seq order.

The window keeps paho's internal queue small (docs/measured.md: beyond 65,535 queued
messages paho silently refuses; beyond ~100 in flight it slows down) and matches AWS
IoT's limit of 100 unacknowledged QoS 1 messages per connection. Entries are removed
only after PUBACK. One connection and seq order keep each robot's messages in order;
on reconnect paho resends the in-flight ones first, in order.

A publish the broker refuses for good (MQTT 5 PUBACK "not authorised", bad topic) is
moved to the outbox's rejected table instead of being resent forever in front of
everything else; any other failure rewinds to it and resends after ``retry_delay``.

Waiting is not being wedged: an idle outbox, a broker that is away, a full window whose
PUBACKs keep arriving (a slow uplink) all keep the watchdog's heartbeat fresh. A broker
that is connected but has acknowledged nothing for ``ack_timeout`` seconds while
publishes wait is wedged: MQTT resends unacknowledged QoS 1 publishes only on a new
connection ([MQTT-4.4.0-1]), so the heartbeat goes stale and systemd's restart makes one.

A backlog (more than ``BACKLOG_ENTRIES`` waiting when paced, ``UNPACED_BACKLOG_ENTRIES``
when not: after an outage) is drained in rounds
in the order bridge/outbox/priority.py gives: each robot's newest state and every event
first, superseded positions after, marked ``replay`` (history the cloud never merges
into state). With ``frame_topic`` set (``BATCH_FRAMES=on``) a round goes out as batch
frames (bridge/frames.py); with ``frame_live`` too (``always``), so does what waits for
a place in the window outside a drain. Pacing (``Pacer``): publishes and bytes a second,
evenly spaced (on by default for AWS IoT Core: 100 publishes/s and 512 KiB/s per
connection); the time spent waiting is counted (``throttled_s``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from bridge import frames
from bridge.backoff import backoff_delay
from bridge.envelope import mark_replay
from bridge.errors import PublishRefusedError, TransportError
from bridge.outbox import Outbox, OutboxEntry
from bridge.service.sdnotify import BEAT_SECONDS
from bridge.service.taskset import within
from bridge.topic import GATEWAY_CHANNELS
from bridge.transport import Transport

#: The longest wait before resending, however often resends keep failing.
RETRY_CAP_SECONDS = 30.0
#: No PUBACK for this long while connected with publishes in flight: wedged. Well under
#: the units' WatchdogSec=30, so systemd restarts within about a minute; a PUBACK takes
#: milliseconds (a second or two on a poor cellular uplink).
ACK_TIMEOUT_SECONDS = 10.0
#: AWS IoT Core's per-connection limits: the awsiot backend's pacing unless set.
AWS_PUBLISHES_PER_SECOND = 100.0
AWS_BYTES_PER_SECOND = 512 * 1024
#: More than this many entries waiting is a backlog: drained newest state first. That
#: is 2 s of sending when paced at AWS's 100/s. Unpaced (a broker on the site or the
#: LAN), a busy gateway's outbox holds a few hundred in any burst, and a drain round,
#: which waits for every PUBACK and re-plans the whole outbox, made it spend ~12 % of
#: its CPU planning and publish in stop-and-wait rounds: there a backlog starts at
#: UNPACED_BACKLOG_ENTRIES (a fraction of a second at the thousands a second it sends).
BACKLOG_ENTRIES = 200
UNPACED_BACKLOG_ENTRIES = 5000

log = logging.getLogger(__name__)


class TokenBucket:
    """``rate`` tokens per second, bursts up to ``burst``; rate 0 means unlimited."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._tokens = self.burst
        self._stamp = time.monotonic()

    def delay(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns how long to wait before using them."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= cost
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


#: A PUBLISH packet's bytes beyond topic and payload: fixed header (up to 5), topic length
#: (2), packet id (2); MQTT 5 properties are not sent by the publisher.
PUBLISH_OVERHEAD = 9


class Pacer:
    """At most ``rate`` publishes and ``byte_rate`` bytes in any one second *as they
    arrive*, which is how AWS IoT Core counts a connection's; 0 means unlimited.

    Sends are spread evenly: each is due a fixed cost after the one before (GCRA's
    virtual scheduling), with ``slack`` seconds of lateness made up so that sleeping a
    little long does not lower the rate. And logs of the last sends hold the limits over
    a little more than a second: the way there (TLS, the network, a busy loop) may bunch
    sends by up to ``jitter`` for publishes (small, quick to arrive) and ``byte_jitter``
    for bytes (a 125 KiB batch frame takes longest to arrive whole), and they still
    arrive within the limits. One publish a second is left for what the transport sends
    by itself (the presence message on each connect). The first version kept one log of
    the last second at 90 %: it sent a second's worth at once each time its oldest entry
    expired, bursts that arrived spread, and the bench's shaping proxy counted 166
    publishes over the limits in a 6,000-entry drain."""

    def __init__(self, rate: float, byte_rate: float, *, jitter: float = 0.03,
                 byte_jitter: float = 0.25, slack: float = 0.02,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.byte_rate = max(rate, 0.0), max(byte_rate, 0.0)
        self.window, self.byte_window = 1.0 + jitter, 1.0 + byte_jitter
        self.interval = self.window / rate if rate > 0 else 0.0
        self.byte_interval = self.byte_window / byte_rate if byte_rate > 0 else 0.0
        self.slack = slack
        self._clock = clock
        self._sends: collections.deque[float] = collections.deque()
        self._sizes: collections.deque[tuple[float, int]] = collections.deque()
        self._bytes = 0
        self._due = -math.inf  # when the next send may go

    @property
    def limited(self) -> bool:
        """Whether any limit is set (unlimited, ``delay`` is always 0)."""
        return bool(self.rate or self.byte_rate)

    def delay(self, size: int) -> float:
        """How long to wait before sending ``size`` bytes; 0: send now (recorded)."""
        if not self.limited:
            return 0.0
        now = self._clock()
        wait = self._due - now
        if self.rate:
            while self._sends and self._sends[0] <= now - self.window:
                self._sends.popleft()
            if len(self._sends) + 1 > self.rate - 1:  # 1 for the presence on connect
                wait = max(wait, self._sends[0] + self.window - now)
        if self.byte_rate:
            while self._sizes and self._sizes[0][0] <= now - self.byte_window:
                self._bytes -= self._sizes.popleft()[1]
            if self._sizes and self._bytes + size > self.byte_rate:
                wait = max(wait, self._sizes[0][0] + self.byte_window - now)
        if wait > 0:
            return wait
        if self.rate:
            self._sends.append(now)
        if self.byte_rate:
            self._sizes.append((now, size))
            self._bytes += size
        self._due = max(self._due, now - self.slack) + \
            max(self.interval, size * self.byte_interval)
        return 0.0


class RateMeter:
    """Events per second, exponentially smoothed over ``tau`` seconds (a drain estimate)."""

    def __init__(self, tau: float = 30.0) -> None:
        self.tau = tau
        self._rate = 0.0
        self._stamp = time.monotonic()

    def add(self, count: int) -> None:
        now = time.monotonic()
        elapsed = max(now - self._stamp, 1e-3)
        weight = math.exp(-elapsed / self.tau)
        self._rate = weight * self._rate + (1 - weight) * (count / elapsed)
        self._stamp = now

    def rate(self) -> float:
        """The smoothed rate, decayed for the time since the last event."""
        return self._rate * math.exp(-(time.monotonic() - self._stamp) / self.tau)


class _Unit(NamedTuple):
    """One publish: an entry on its own topic, or a batch frame of several (``seqs``)."""

    seqs: list[int]
    topic: str
    payload: bytes
    qos: int
    retain: bool

    @classmethod
    def alone(cls, item: tuple[OutboxEntry, bytes]) -> _Unit:
        entry, payload = item
        return cls([entry.seq], entry.topic, payload, entry.qos, entry.retain)

    @classmethod
    def packed(cls, topic: str, run: list[tuple[OutboxEntry, bytes]]) -> _Unit:
        """A frame of ``run`` on ``topic``; a run of one goes alone on its own topic."""
        if len(run) == 1:
            return cls.alone(run[0])
        frame = next(frames.pack([payload for _, payload in run]))[1]
        return cls([entry.seq for entry, _ in run], topic, frame, 1, False)


class OutboxPublisher:
    """Publishes outbox entries in order and deletes each on its PUBACK."""

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        *,
        window: int = 100,
        rate_limit: float = 0.0,
        byte_limit: float = 0.0,
        frame_topic: str | None = None,
        frame_live: bool = False,
        backlog: int | None = None,
        retry_delay: float = 1.0,
        ack_timeout: float = ACK_TIMEOUT_SECONDS,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.window = window
        self._peek_limit = max(window * 4, 200)  # entries read ahead of the window
        self.retry_delay = retry_delay
        self.ack_timeout = ack_timeout
        # The watchdog's heartbeat: stamped every iteration, idle or not, unless stalled.
        self._heartbeat = beat
        self.published = 0
        self.failed = 0
        self.rejected = 0
        self._pacer = Pacer(rate_limit, byte_limit)
        self.throttled_s = 0.0  # time spent waiting for the buckets
        self.frame_topic = frame_topic
        # Live bursts in frames too (BATCH_FRAMES=always): what waits when the publisher
        # comes round, not only a backlog's rounds.
        self.frame_live = frame_live
        if backlog is None:
            backlog = BACKLOG_ENTRIES if rate_limit or byte_limit else UNPACED_BACKLOG_ENTRIES
        self.backlog = backlog
        self.frames = 0  # batch frames published
        self.replayed = 0  # superseded entries published as history
        self._draining = False
        self.rate = RateMeter()
        self._slots = asyncio.Semaphore(window)
        self._inflight: set[int] = set()  # seqs; a frame's by its first seq
        self._frame_seqs: dict[int, list[int]] = {}
        self._acked: list[int] = []
        self._retry_from: int | None = None
        self._resends = 0  # resend rounds since the last PUBACK: the back-off's exponent
        self._idle = asyncio.Event()
        self._idle.set()
        # Last sign of progress while publishes wait: a PUBACK (or a failure), a
        # (re)connect, or the window starting to fill after it was empty.
        self._progress_at = time.monotonic()
        self._stall_reported = False
        transport.add_connection_listener(self._on_connection)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def draining(self) -> bool:
        """Whether a backlog is being drained newest state first."""
        return self._draining

    def drain_estimate_s(self) -> float | None:
        """Seconds to empty the outbox at the recent publish rate; None while nothing is
        being published (broker away), 0 when empty."""
        if self.outbox.depth == 0:
            return 0.0
        rate = self.rate.rate()
        return None if rate < 0.01 else self.outbox.depth / rate

    def stalled_for(self) -> float:
        """Seconds the broker has been connected, with publishes in flight, without
        acknowledging any of them; 0 while disconnected, idle or making progress."""
        if not self._inflight or not self.transport.connected:
            return 0.0
        return time.monotonic() - self._progress_at

    def beat(self) -> None:
        """Stamp the watchdog's heartbeat, unless the broker stopped acknowledging."""
        stalled = self.stalled_for()
        if stalled <= self.ack_timeout:
            self._stall_reported = False
            self._heartbeat()
            return
        if not self._stall_reported:
            self._stall_reported = True
            log.error("the broker has acknowledged none of %d publishes for %.0f s while "
                      "connected; publisher wedged (the watchdog restart reconnects and "
                      "resends them)", len(self._inflight), stalled)

    async def run(self) -> None:
        """Run until cancelled."""
        cursor = 0
        while True:
            self.beat()
            if self._retry_from is not None:
                if not await within(self._wait_window_empty(), BEAT_SECONDS):
                    continue
                cursor, self._retry_from = self._retry_from, None
                await self._back_off()
            if not await within(self.transport.wait_connected(), BEAT_SECONDS):
                continue  # offline: come round to stamp the heartbeat
            if self._draining or self.outbox.depth > self.backlog:
                self._draining = True  # during the first round too (health's "draining")
                self._draining = await self._drain_round()
                cursor = 0  # after a drain, seq order resumes from what is left
                continue
            entries = await self.outbox.peek(cursor, limit=self._peek_limit)
            if not entries:
                await within(self.outbox.wait_changed(), BEAT_SECONDS)
                continue
            if self.frame_live and self.frame_topic is not None:
                cursor = await self._send_packed(cursor, entries)
                continue
            for entry in entries:
                if self._retry_from is not None:
                    break
                await self._take_slot()
                await self.pace(entry.topic, entry.payload)
                self._send(_Unit.alone((entry, entry.payload)))
                cursor = entry.seq

    async def _send_packed(self, cursor: int, waiting: list[OutboxEntry]) -> int:
        """Live traffic with ``frame_live``: once a place in the window is free, what waits
        after ``cursor`` *then* goes out as its first unit (a frame of the robot envelopes
        that arrived while the window was full, or one entry alone); returns the new
        cursor. Packing when the slot is had, not when ``waiting`` was read, is what lets
        a burst that outruns the PUBACKs fill frames: after a wait for the slot, what
        waits is read again."""
        full = self._slots.locked()
        await self._take_slot()  # a free place is taken at once: nothing arrives meanwhile
        if full:
            waiting = await self.outbox.peek(cursor, limit=self._peek_limit)
        if self._retry_from is not None or not waiting:
            self._slots.release()
            return cursor
        unit = next(self._units([(entry, entry.payload) for entry in waiting]))
        await self.pace(unit.topic, unit.payload)
        self._send(unit)
        return unit.seqs[-1]

    async def _take_slot(self) -> None:
        """A place in the window. A free one is taken at once, with no timer armed and
        cancelled for it; a full window is waited for in turns that stamp the heartbeat:
        waiting, wedged only without PUBACKs (``beat``)."""
        if not self._slots.locked():
            await self._slots.acquire()
            return
        while not await within(self._slots.acquire(), BEAT_SECONDS):
            self.beat()

    async def pace(self, topic: str, payload: bytes) -> None:
        """Wait until the limits (publishes, bytes a second) allow one more; the wait is
        counted as throttled. AWS counts the PUBLISH packet, topic and header included.
        The agent's other publishes on this connection (the heartbeat) wait here too:
        AWS counts them against the same limits."""
        if not self._pacer.limited:
            return  # unpaced (the default off AWS): nothing to count or wait for
        size = len(payload) + len(topic.encode()) + PUBLISH_OVERHEAD
        while pause := self._pacer.delay(size):
            self.throttled_s += pause
            await asyncio.sleep(pause)

    def _send(self, unit: _Unit) -> None:
        fut = self.transport.publish(unit.topic, unit.payload, unit.qos, unit.retain)
        if not self._inflight:
            self._progress_at = time.monotonic()
        seq = unit.seqs[0]
        if len(unit.seqs) > 1:
            self.frames += 1
            self._frame_seqs[seq] = unit.seqs
        self._inflight.add(seq)
        self._idle.clear()
        fut.add_done_callback(functools.partial(self._done, seq))

    def _units(self, items: Iterable[tuple[OutboxEntry, bytes]]) -> Iterator[_Unit]:
        """What ``items`` (entries in order, each with the payload to send) go out as:
        each run of frameable entries in batch frames, a run of one on its own topic,
        everything else alone; without ``frame_topic``, each alone. Lazily: a live send
        takes only the first."""
        topic = self.frame_topic  # as it was at the start: a refusal may turn it off
        if topic is None:
            yield from map(_Unit.alone, items)
            return
        root = topic.rsplit("/device/", 1)[0] + "/device/"  # the org's devices
        run: list[tuple[OutboxEntry, bytes]] = []
        size = 0
        for entry, payload in items:
            frameable = self._frameable(entry, root)
            if run and (not frameable or not frames.fits(size, payload)):
                yield _Unit.packed(topic, run)
                run, size = [], 0
            if not frameable:
                yield _Unit.alone((entry, payload))
                continue
            run.append((entry, payload))
            size += len(payload) + 1
        if run:
            yield _Unit.packed(topic, run)

    async def _drain_round(self) -> bool:
        """Publish one round of a backlog in drain order; returns whether a backlog
        remains. Each round starts with nothing in flight and the acked entries removed
        (or left out of the plan until their removal is written: on a full disk, later),
        so it never sends one twice, and is about a window long: fresh callbacks go out
        in the next round, within a second or two."""
        if not await within(self._idle.wait(), BEAT_SECONDS):
            return True
        self._flush_acks()
        chunk = self.window * (10 if self.frame_topic else 1)
        if not self._pacer.limited:
            # Unpaced, a round of one window was stop-and-wait with the whole outbox
            # re-planned each time: 100,000 entries drained at ~800/s instead of ~17,000.
            chunk = max(chunk, UNPACED_BACKLOG_ENTRIES)
        plan = await self.outbox.drain_plan(chunk)
        if not plan:
            return False
        items = []
        for entry, history in plan:
            items.append((entry, mark_replay(entry.payload) if history else entry.payload))
            self.replayed += history
        for unit in self._units(items):
            if self._retry_from is not None:
                break
            await self._take_slot()
            await self.pace(unit.topic, unit.payload)
            self._send(unit)
        has_history = any(history for _, history in plan)
        return has_history or len(plan) >= chunk or self.outbox.depth > self.backlog

    @staticmethod
    def _frameable(entry: OutboxEntry, root: str) -> bool:
        """A robot message of this gateway's org (its topic under ``root``), QoS 1, not
        retained: it may travel in a frame (gateway traffic and retained messages keep
        their own topics)."""
        return (entry.qos == 1 and not entry.retain and entry.topic.startswith(root)
                and entry.topic.rsplit("/", 1)[-1] not in GATEWAY_CHANNELS)

    async def settle(self, grace: float) -> None:
        """Stopping, after ``run`` was cancelled: wait (bounded) for the PUBACKs of what is
        in flight, so those entries are deleted now rather than resent after the restart."""
        if await within(self._idle.wait(), grace):
            self._flush_acks()
        else:
            log.info("%d publishes still unacknowledged at stop; they stay in the outbox",
                     len(self._inflight))

    async def wait_drained(self) -> None:
        """Wait until the outbox is empty and nothing is in flight (flush_outbox)."""
        # Not outbox.wait_changed(): that event is run()'s own, and run() clears it, so a
        # second waiter could miss the last change and wait for ever.
        while self.outbox.depth > 0 or self._inflight:
            await self.outbox.wait_empty()
            await self._idle.wait()

    async def _back_off(self) -> None:
        """Wait before resending: ``retry_delay`` at first, growing with jitter while
        resends keep failing (a broker's quota refusal), so a fleet does not retry in step;
        the heartbeat is stamped meanwhile, since waiting is not being wedged."""
        delay = backoff_delay(self._resends, self.retry_delay,
                              max(self.retry_delay, RETRY_CAP_SECONDS))
        self._resends += 1
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, BEAT_SECONDS))
            self.beat()

    async def _wait_window_empty(self) -> None:
        await self._idle.wait()

    def _on_connection(self, up: bool) -> None:
        if up:  # the new connection resends what is in flight: its acks start afresh
            self._progress_at = time.monotonic()

    def _done(self, seq: int, fut: asyncio.Future[None]) -> None:
        self._progress_at = time.monotonic()
        self._inflight.discard(seq)
        seqs = self._frame_seqs.pop(seq, [seq])
        self._slots.release()
        if not self._inflight:
            self._idle.set()
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, PublishRefusedError) and exc.permanent:
            self.rejected += 1
            log.error("outbox entry %d set aside in the rejected table: %s", seq, exc)
            if len(seqs) > 1:  # a frame refused for good: its entries go on their own
                log.error("the broker refuses batch frames on %s (%s); sending each "
                          "message on its own topic from now on", self.frame_topic, exc)
                self.frame_topic = None
                self._retry_from = 0
                self.outbox.wake()
                return
            self.outbox.reject(seq, str(exc))
            return
        if fut.cancelled() or exc is not None:
            self.failed += 1
            if isinstance(exc, TransportError):
                log.warning("publish of outbox entry %d failed: %s; will resend", seq, exc)
            back = seq - 1
            self._retry_from = back if self._retry_from is None else min(self._retry_from, back)
            self.outbox.wake()  # run() may be waiting for new entries: the resend is due now
            return
        self.published += 1
        self._resends = 0
        if not self._acked:
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._acked.extend(seqs)

    def _flush_acks(self) -> None:
        """Remove every entry acked during this loop tick in one outbox operation."""
        acked, self._acked = self._acked, []
        self.rate.add(len(acked))
        self.outbox.remove(acked)
