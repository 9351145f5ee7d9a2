"""The service lifecycle under systemd's eyes: READY=1 once bound, WATCHDOG=1 only while
every loop makes progress, an ordered stop that open streams cannot hold, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge.service.sdnotify import Notifier, Watchdog
from tests.support.mqtt_probe import Probe
from tests.support.procs import free_port, wait_for_port
from tests.support.services import ADMIN_TOKEN, callback_server, edge_agent
from tests.support.waiting import eventually

BROKER = "mqtt://127.0.0.1:1883"


class NotifySocket:
    """A test-owned $NOTIFY_SOCKET: collects what the service sends systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lines: list[str] = []

    def wait_for(self, line: str, timeout: float = 20.0, *, count: int = 1) -> list[str]:
        """Block until ``line`` arrived ``count`` times (reading datagrams, not sleeping)."""
        def received() -> list[str]:  # recv's own timeout paces this: no extra wait
            if sum(1 for seen in self.lines if seen == line) < count:
                with contextlib.suppress(TimeoutError):
                    self.lines += self.sock.recv(4096).decode().split("\n")
            return self.lines

        return eventually(received, accept=lambda lines: sum(
            1 for seen in lines if seen == line) >= count, within=timeout, every=0,
            what=f"{line} x{count} notified")

    def drain(self, seconds: float) -> list[str]:
        """Everything sent during the next ``seconds``."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got += self.sock.recv(4096).decode().split("\n")
        self.lines += got
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def systemd_env(notify: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}


@pytest.mark.integration
def test_both_services_say_ready_then_ping_the_watchdog(tmp_path: Path,
                                                        notify: NotifySocket) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    with edge_agent(tmp_path, BROKER, org="acme", TOPIC_PREFIX=p, **systemd_env(notify)):
        lines = notify.wait_for("READY=1")
        assert any(line.startswith("STATUS=") and "outbox" in line for line in lines)
        notify.wait_for("WATCHDOG=1", count=2)
    notify.wait_for("STOPPING=1", timeout=5)
    notify.lines.clear()
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p, **systemd_env(notify)):
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", count=2)


@pytest.mark.integration
def test_ready_does_not_wait_for_the_broker(tmp_path: Path, notify: NotifySocket) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    with edge_agent(tmp_path, dead, org="acme", **systemd_env(notify)) as agent:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", count=3)  # offline is not wedged
        r = httpx.post(agent.url + "/api/pudu/webhook", headers={"CallbackCode": "test-code"},
                       json={"callback_type": "notifyRobotPose", "data": {"sn": "R1", "x": 1,
                                                                           "y": 2}})
        assert r.status_code == 200  # webhooks are taken while the uplink is down


class SilentBroker:
    """A raw-TCP MQTT 3.1.1 broker that accepts CONNECT, SUBSCRIBE and PINGREQ but never
    sends a PUBACK: connected, and wedged for whoever waits on its acks."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.publishes = 0
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="silent-broker",
                                        daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the server socket closed: the test is over
            while True:
                conn, _ = self.server.accept()
                self._conns.append(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while True:
                kind = self._read(conn, 1)[0] >> 4
                length, shift = 0, 0
                while True:  # the remaining length, 7 bits a byte (MQTT 3.1.1 2.2.3)
                    byte = self._read(conn, 1)[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = self._read(conn, length)
                if kind == 1:  # CONNECT -> CONNACK, accepted, no session present
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 8:  # SUBSCRIBE -> SUBACK granting QoS 1 to each filter
                    filters, at = 0, 2
                    while at < len(body):
                        at += 2 + int.from_bytes(body[at:at + 2], "big") + 1
                        filters += 1
                    conn.sendall(bytes([0x90, 2 + filters]) + body[:2] + b"\x01" * filters)
                elif kind == 12:  # PINGREQ -> PINGRESP: the connection stays up
                    conn.sendall(b"\xd0\x00")
                elif kind == 3:  # PUBLISH: never acknowledged
                    self.publishes += 1
                elif kind == 14:  # DISCONNECT
                    return

    def close(self) -> None:
        self.server.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


@pytest.mark.integration
def test_a_broker_that_never_acks_stops_the_watchdog_pings(tmp_path: Path,
                                                           notify: NotifySocket) -> None:
    broker = SilentBroker()
    try:
        with edge_agent(tmp_path, f"mqtt://127.0.0.1:{broker.port}?protocol=3.1.1",
                        org="acme", PUBLISH_ACK_TIMEOUT_SECONDS="1",
                        **systemd_env(notify)) as agent:
            notify.wait_for("READY=1")
            agent.wait_health("broker_connected", True)
            notify.wait_for("WATCHDOG=1", count=2)  # connected and idle: alive
            with httpx.Client(base_url=agent.url, headers={"CallbackCode": "test-code"}) as c:
                for i in range(20):
                    assert c.post("/api/pudu/webhook", json={
                        "callback_type": "notifyRobotPower",
                        "data": {"sn": f"R{i}", "power": 50}}).status_code == 200
            agent.wait_health("inflight", 20)
            # The ack timeout (1 s) passes (STATUS= says so), then the watchdog's stale
            # limit (4 s) ...
            assert any("no PUBACK for" in line for line in notify.drain(6.0))
            # ... and then systemd hears nothing: with WatchdogSec=2 it would restart us.
            assert "WATCHDOG=1" not in notify.drain(3.0)
            health = agent.health()
            assert health["broker_connected"] and health["published"] == 0
            assert health["outbox_depth"] == 20  # nothing lost: resent after the restart
            assert broker.publishes >= 20  # sent, never acknowledged
        assert "publisher wedged" in agent.log_path.read_text()
        assert "stopped making progress" in agent.log_path.read_text()
    finally:
        broker.close()


async def test_a_wedged_loop_stops_the_watchdog_pings(notify: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    watchdog = Watchdog(notifier)
    beat = watchdog.beat("publisher")
    wedged = asyncio.Event()

    async def publisher() -> None:  # a loop that stamps, until a call never returns
        while not wedged.is_set():
            beat()
            await asyncio.sleep(0.05)
        await asyncio.Event().wait()  # stuck inside a call

    tasks = [asyncio.create_task(publisher(), name="publisher"),
             asyncio.create_task(watchdog.run(), name="watchdog")]
    try:
        await asyncio.to_thread(notify.wait_for, "WATCHDOG=1", 10, count=2)
        wedged.set()
        await asyncio.to_thread(notify.drain, 5.0)  # the stale limit (4 s) passes
        assert "WATCHDOG=1" not in await asyncio.to_thread(notify.drain, 2.0)
        assert watchdog.stale(4.0) == ["publisher"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        notifier.close()


def open_streams(url: str, topic: str, token: str, count: int = 3) -> list[threading.Thread]:
    """``count`` SSE readers that never leave by themselves; returns once each has its
    first event (the server's ``subscribed``), so every stream is really open."""
    opened = threading.Semaphore(0)

    def stream() -> None:
        first = True
        with contextlib.suppress(httpx.HTTPError), httpx.stream(
                "GET", url + "/mqtt/stream", params={"topic": topic},
                headers={"Authorization": f"Bearer {token}"}, timeout=30) as r:
            for _ in r.iter_lines():
                if first:
                    opened.release()
                    first = False

    readers = [threading.Thread(target=stream, daemon=True) for _ in range(count)]
    for reader in readers:
        reader.start()
    for _ in readers:
        assert opened.acquire(timeout=10), "a stream did not open"
    return readers


def sigterm(proc: subprocess.Popen[bytes] | None) -> tuple[int, float]:
    """SIGTERM, then the exit code and how long the stop took (systemd allows 20 s)."""
    assert proc is not None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)  # systemd's TimeoutStopSec
    return code, time.monotonic() - started


@pytest.mark.integration
def test_sigterm_with_open_streams_and_a_backlog_stops_in_time(tmp_path: Path) -> None:
    p, org = f"t{uuid.uuid4().hex[:8]}", "acme"
    token = "proxy-token-0123456789abcdef"
    with Probe(BROKER, f"{p}/org/{org}/device/#", persistent=False) as probe:
        # 10 msg/s after a burst of 10: most of the 300 are still waiting at SIGTERM.
        agent = edge_agent(tmp_path, BROKER, org=org, TOPIC_PREFIX=p, PROXY_TOKEN=token,
                           PUBLISH_RATE_LIMIT="10")
        agent.start()
        readers = open_streams(agent.admin_url, f"{p}/org/{org}/#", token)
        with httpx.Client(base_url=agent.url, headers={"CallbackCode": "test-code"}) as c:
            for i in range(300):  # the backlog: accepted, not all published yet
                assert c.post("/api/pudu/webhook", json={
                    "callback_type": "notifyRobotPower",
                    "data": {"sn": f"R{i % 7}", "power": i % 100, "notify_timestamp": i + 1}}
                ).status_code == 200
        backlog = agent.health()["outbox_depth"]
        assert backlog > 50, backlog
        code, took = sigterm(agent.proc)
        assert code == 0 and took < 10, (code, took)
        for reader in readers:
            reader.join(5)
            assert not reader.is_alive(), "a stream outlived the agent"
        # The broker hands the agent's last word on after the agent has gone.
        probe.wait_until(lambda seen: [m.payload for m in seen
                                       if m.topic.endswith("/presence")][-1:] == [b"offline"],
                         "the agent's offline presence", timeout=10)
        with Probe(BROKER, f"{p}/org/{org}/device/gw1/presence") as late:  # a newcomer
            retained = late.wait_for(1, timeout=5)[0]
        assert (retained.payload, retained.retain) == (b"offline", True)
        agent.env["PUBLISH_RATE_LIMIT"] = "0"
        agent.start()  # whatever was left in the outbox goes out now
        probe.wait_for(300 + 3)
        probe.wait_until(lambda seen: len({json.loads(m.payload)["id"] for m in seen
                                           if m.topic.endswith("/power")}) >= 300,
                         "every committed callback published after the restart", timeout=20)
        agent.stop()
    print(f"stopped in {took:.2f} s with 3 open streams and {backlog} waiting")


@pytest.mark.integration
def test_sigterm_stops_the_callback_server_with_open_streams_in_time(tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    server = callback_server(tmp_path, BROKER, f"sqlite:///{tmp_path / 'cb.db'}",
                             TOPIC_PREFIX=p)
    server.start()
    readers = open_streams(server.url, f"{p}/org/acme/#", ADMIN_TOKEN)
    code, took = sigterm(server.proc)
    assert code == 0 and took < 10, (code, took)
    for reader in readers:
        reader.join(5)
        assert not reader.is_alive(), "a stream outlived the server"
    print(f"callback server stopped in {took:.2f} s with 3 open streams")


@pytest.mark.integration
def test_sigterm_while_the_callback_server_starts_is_an_orderly_stop(tmp_path: Path) -> None:
    # The broker is away: starting waits up to 5 s for the subscription. The port is
    # bound first, so once it answers the service is starting, not yet serving.
    dead = f"mqtt://127.0.0.1:{free_port()}"
    server = callback_server(tmp_path, dead, f"sqlite:///{tmp_path / 'cb.db'}")
    with server.log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "callback_server", "run"],
                                env=server.env, stdout=log, stderr=log)
    try:
        wait_for_port("127.0.0.1", server.port, timeout=20)
        code, took = sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 0, (code, server.log_path.read_text()[-2000:])  # not killed (-15)
    assert took < 10 and "stopping" in server.log_path.read_text()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True,
                          text=True, timeout=30, env=env, check=False)


@pytest.mark.integration
def test_a_second_agent_on_the_same_outbox_or_port_exits_3(tmp_path: Path) -> None:
    with edge_agent(tmp_path, BROKER, org="acme") as agent:
        env = {**agent.env, "EDGE_HTTP_PORT": str(free_port()),
               "EDGE_ADMIN_PORT": str(free_port())}  # free ports: only the outbox is held
        locked = run_cli("run", env=env)
        assert locked.returncode == 3, locked.stderr
        assert "in use by another process" in locked.stderr
        assert "Traceback" not in locked.stderr
        bound = run_cli("run", env={**agent.env, "OUTBOX_PATH": str(tmp_path / "other.db")})
        assert bound.returncode == 3 and "cannot listen on" in bound.stderr, bound.stderr
        assert "Traceback" not in bound.stderr and "listening on" not in bound.stderr

