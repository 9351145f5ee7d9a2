"""Descriptor exhaustion: idle and slow-header clients cannot stop webhooks being answered.

A real edge-agent process with the unit file's ``LimitNOFILE`` (inherited from this test
process, which applies it to itself first), real sockets on loopback, bounded in count
and in time.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import resource
import socket
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import pytest

from tests.support.services import ServiceProcess, edge_agent

pytestmark = pytest.mark.integration

UNIT = Path(__file__).parents[2] / "systemd" / "edge-agent.service"
IDLE = 1_100          # more than systemd's default soft limit of 1,024 descriptors
SLOW = 200            # clients sending their headers one byte a second
DURATION = 30.0       # seconds the attack lasts
HEADER_TIMEOUT = 3.0  # shorter than the 10 s default, to keep the suite fast
WEBHOOK = json.dumps({"callback_type": "notifyRobotPower",
                      "data": {"sn": "LIM1", "power": 80, "charge_stage": "idle"}}).encode()


def unit_nofile() -> int:
    match = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M)
    assert match, f"{UNIT.name} sets no LimitNOFILE"
    return int(match.group(1))


@pytest.fixture
def unit_limit() -> Iterator[int]:
    """This process (and so the agent it starts) gets the unit's descriptor limit."""
    limit = unit_nofile()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.fail(f"hard RLIMIT_NOFILE {hard} is below the unit's {limit}", pytrace=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def agent(tmp_path: Path, unit_limit: int) -> Iterator[ServiceProcess]:
    with edge_agent(tmp_path, "mqtt://127.0.0.1:1883", org=f"lim{uuid.uuid4().hex[:6]}",
                    HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT)) as proc:
        yield proc


@dataclass
class Held:
    """How long the server let connections of one kind live, and how they ended."""

    lifetimes: list[float] = field(default_factory=list)
    connects: int = 0


class Wave:
    """``event`` is set once each of ``size`` clients has connected for the first time."""

    def __init__(self, size: int) -> None:
        self.waiting = size
        self.event = asyncio.Event()

    def arrived(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.event.set()


async def hold_idle(port: int, held: Held, wave: Wave, until: float) -> None:
    """Connect and send nothing; when the server closes, connect again until ``until``."""
    first = True
    while time.monotonic() < until:
        opened = time.monotonic()  # before connecting: the server's timer starts later
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.connects += 1
        if first:
            wave.arrived()
            first = False
        try:
            async with asyncio.timeout(max(0.0, until - opened)):
                data = await reader.read(1)
            assert data == b"", data  # nothing is ever answered to a silent client
            held.lifetimes.append(time.monotonic() - opened)
        except ConnectionResetError:
            held.lifetimes.append(time.monotonic() - opened)
        except TimeoutError:
            pass  # the attack is over
        finally:
            writer.close()


async def trickle_headers(port: int, held: Held, wave: Wave, until: float) -> None:
    """Send a request's headers one byte a second, forever; reconnect when cut off."""
    head = b"POST /api/pudu/webhook HTTP/1.1\r\nHost: gw\r\nCallbackCode: test-code\r\nX-Slow: "
    first = True
    while time.monotonic() < until:
        opened = time.monotonic()  # before connecting: the server's timer starts later
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.connects += 1
        if first:
            wave.arrived()
            first = False
        try:
            for byte in (head + b"a" * 10_000):
                if time.monotonic() >= until:
                    return
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    # Pacing, and noticing the close: one byte per second unless cut off.
                    data = await asyncio.wait_for(reader.read(1), 1.0)
                except TimeoutError:
                    continue
                assert data == b"", data
                held.lifetimes.append(time.monotonic() - opened)
                break
        except (ConnectionResetError, BrokenPipeError):
            held.lifetimes.append(time.monotonic() - opened)
        finally:
            writer.close()


async def attack(port: int, report: Connection) -> None:
    """IDLE silent and SLOW trickling clients for DURATION seconds; lifetimes to ``report``."""
    idle, slow = Held(), Held()
    until = time.monotonic() + DURATION
    wave = Wave(IDLE + SLOW)
    attackers = [asyncio.create_task(hold_idle(port, idle, wave, until), name=f"idle-{i}")
                 for i in range(IDLE)]
    attackers += [asyncio.create_task(trickle_headers(port, slow, wave, until),
                                      name=f"slow-{i}") for i in range(SLOW)]
    await wave.event.wait()  # every client connected once
    report.send(("started", until - time.monotonic()))
    await asyncio.gather(*attackers)
    report.send(("done", {"idle": [idle.connects, idle.lifetimes],
                          "slow": [slow.connects, slow.lifetimes]}))


def run_attack(port: int, report: Connection) -> None:
    """The attack in its own process, so the webhook timings below are the agent's alone."""
    asyncio.run(attack(port, report))


def send_webhooks(url: str, seconds: float) -> list[tuple[int, float]]:
    """An ordinary webhook four times a second, each on a new connection."""
    results: list[tuple[int, float]] = []
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, limits=limits, timeout=10,
                      headers={"CallbackCode": "test-code"}) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            response = client.post("/api/pudu/webhook", content=WEBHOOK)
            results.append((response.status_code, time.monotonic() - started))
            time.sleep(0.25)  # pacing of the ordinary traffic, not a wait for state
    return results


def child_nofile(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)", limits, re.M)
    assert match
    return int(match.group(1))


def test_idle_and_slow_clients_do_not_stop_webhooks(agent: ServiceProcess,
                                                    unit_limit: int) -> None:
    assert agent.proc is not None
    assert child_nofile(agent.proc.pid) == unit_limit
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    attacker = ctx.Process(target=run_attack, args=(agent.port, theirs), name="attack")
    attacker.start()
    try:
        assert ours.poll(20), "the attack did not start"
        kind, remaining = ours.recv()
        assert kind == "started"
        webhooks = send_webhooks(agent.url, remaining)
        assert ours.poll(DURATION), "the attack did not end"
        kind, held = ours.recv()
        attacker.join(10)
    finally:
        if attacker.is_alive():
            attacker.kill()
            attacker.join(5)
    (idle_connects, idle), (slow_connects, slow) = held["idle"], held["slow"]

    latencies = [seconds for _, seconds in webhooks]
    print(f"\nwebhooks: {len(webhooks)}, p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms; idle connects {idle_connects}, closed after "
          f"{min(idle):.2f}-{max(idle):.2f} s (median {statistics.median(idle):.2f}); "
          f"slow connects {slow_connects}, closed after {min(slow):.2f}-{max(slow):.2f} s")
    assert len(webhooks) > DURATION * 2
    assert all(status == 200 for status, _ in webhooks), webhooks
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    # Every idle socket of the first wave (and of the waves after) was closed by the
    # header timeout: not before it, and not long after it.
    assert len(idle) >= IDLE
    assert min(idle) >= HEADER_TIMEOUT - 0.05  # timer resolution, two processes' clocks
    assert max(idle) < HEADER_TIMEOUT + 3.0
    # A client still trickling its headers is cut off by the same timer.
    assert len(slow) >= SLOW
    assert min(slow) >= HEADER_TIMEOUT - 0.05
    assert max(slow) < HEADER_TIMEOUT + 3.0
    assert agent.health()["status"] in ("healthy", "degraded")  # still serving after it all


def test_over_the_connection_cap_is_answered_503_with_retry_after(tmp_path: Path) -> None:
    keepalive = 3.0
    with edge_agent(tmp_path, "mqtt://127.0.0.1:1883", org=f"cap{uuid.uuid4().hex[:6]}",
                    HTTP_MAX_CONNECTIONS="20",
                    HTTP_KEEPALIVE_TIMEOUT_SECONDS=str(keepalive)) as agent:
        held = [socket.create_connection(("127.0.0.1", agent.port)) for _ in range(20)]
        try:
            # Each answered once: all 20 are accepted, kept alive, and count against the cap.
            for sock in held:
                sock.settimeout(10)
                sock.sendall(b"GET /api/pudu/webhook/health HTTP/1.1\r\nHost: gw\r\n\r\n")
                assert read_response(sock).startswith(b"HTTP/1.1 200")
            answered = time.monotonic()
            with httpx.Client(base_url=agent.url, timeout=5) as client:
                busy = client.post("/api/pudu/webhook", content=WEBHOOK,
                                   headers={"CallbackCode": "test-code"})
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "5"
            assert busy.json()["status"] == "error" and "connections" in busy.json()["message"]
            # Idle after their answer, the kept-alive connections are closed by the server.
            assert held[-1].recv(1) == b""
            idle_for = time.monotonic() - answered
            assert keepalive - 0.5 <= idle_for < keepalive + 3.0, idle_for
        finally:
            for sock in held:
                sock.close()
        with httpx.Client(base_url=agent.url, timeout=5) as client:
            ok = client.post("/api/pudu/webhook", content=WEBHOOK,
                             headers={"CallbackCode": "test-code"})
            assert ok.status_code == 200, ok.text


def read_response(sock: socket.socket) -> bytes:
    """One small response with Content-Length, read off a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_websocket_upgrades_do_not_use_up_the_cap(tmp_path: Path) -> None:
    """uvicorn hands an upgraded connection to another protocol, whose close the cap never
    saw: 20 upgrade requests (no credentials) once left every webhook answered 503."""
    upgrade = (b"GET /api/pudu/webhook HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    with edge_agent(tmp_path, "mqtt://127.0.0.1:1883", org=f"ws{uuid.uuid4().hex[:6]}",
                    HTTP_MAX_CONNECTIONS="20") as agent:
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
                sock.sendall(upgrade)
                answer = read_response(sock)
                assert answer.startswith(b"HTTP/1.1 400"), answer
                assert b'"status": "error"' in answer
        with httpx.Client(base_url=agent.url, timeout=5) as client:
            ok = client.post("/api/pudu/webhook", content=WEBHOOK,
                             headers={"CallbackCode": "test-code"})
            assert ok.status_code == 200, ok.text
