"""Poison on the MQTT stream: thousands of broken envelopes of every fault class, then
valid ones; nothing stalls, each poison message is dead-lettered exactly once, and health
never says healthy over a stalled stream — also across SIGKILL and the persistent
session's redelivery."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.dbutil import query
from tests.support.hostile import FAULT_CLASSES, poison_payloads, valid_envelope
from tests.support.services import ServiceProcess, callback_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
STALL = 0.5  # the run lasts seconds: a bound of 5 s could never be crossed in it


class HealthSampler:
    """Reads /callback/health every 20 ms in a thread, keeping every answer and when it
    came (none while the server is killed). Every 100 ms, a quick host once drained each
    burst between two samples, and no sample saw a message waiting."""

    def __init__(self, service: ServiceProcess) -> None:
        self.service = service
        self.samples: list[dict[str, Any]] = []
        self.answered: list[float] = []  # monotonic, one per sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.02):
                with contextlib.suppress(httpx.TransportError):  # killed on purpose
                    self.samples.append(client.get(self.service.url + "/callback/health",
                                                   headers=self.service.auth).json())
                    self.answered.append(time.monotonic())

    def __enter__(self) -> HealthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def observe(self, seconds: float) -> None:
        """Sample on until answers reach ``seconds`` from now: past the bound, so a
        message left waiting (a stall) is seen waiting longer than STALL."""
        until = time.monotonic() + seconds
        eventually(lambda: self.answered and self.answered[-1] >= until, within=seconds + 10,
                   what="health answering past the bound")

    def assert_never_healthy_over_a_stall(self) -> None:
        """No answer says healthy while a message waited past STALL; the answers saw the
        stream busy and run on past the bound (``observe``), so the check can bite."""
        assert any(s["unacked"] for s in self.samples), "no sample saw a message waiting"
        span = self.answered[-1] - self.answered[0]
        assert span > 2 * STALL, f"health sampled over {span:.2f} s only"
        for s in self.samples:
            if s["oldest_unacked_seconds"] > STALL:
                assert s["status"] == "degraded" and s["reasons"], s


def publish_all(topic: str, payloads: list[bytes]) -> None:
    publish_each([(topic, p) for p in payloads])


def publish_each(messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 from one client and wait for every PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        infos = [client.publish(topic, p, qos=1) for topic, p in messages]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def digest(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()


def wait_stored(cs: ServiceProcess, sns: list[str], timeout: float) -> float:
    """Seconds until every robot in ``sns`` is readable; TimeoutError past ``timeout``."""
    started = time.monotonic()
    pending = set(sns)
    with httpx.Client(base_url=cs.url, timeout=5, headers=cs.auth) as client:

        def unreadable() -> list[str]:  # polling the read API: what a user would do
            pending.difference_update(
                {sn for sn in pending if client.get(f"/robots/{sn}").status_code == 200})
            return sorted(pending)[:5]

        eventually(unreadable, accept=lambda left: not left, within=timeout,
                   what="every robot readable")
    return time.monotonic() - started


def valid(org: str, prefix: str, tag: str, count: int) -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(count):
        sn = f"V{tag}{i}"
        env = valid_envelope(org, sn, i)
        out.append((sn, f"{prefix}/org/{org}/device/{sn}/power", json.dumps(env).encode()))
    return out


def test_poison_flood_then_kill_never_stalls_and_dead_letters_each_once(tmp_path: Path) -> None:
    org, prefix = "acme", f"p{uuid.uuid4().hex[:8]}"
    poison = poison_payloads(org, "R1", per_class=150)
    classes = {name for name, _ in poison}
    assert len(poison) >= 2000 and len(classes) >= 12, (len(poison), len(classes))
    topic = f"{prefix}/org/{org}/device/R1/power"
    first, second = poison[: len(poison) // 2], poison[len(poison) // 2:]
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    cs = callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=prefix, STALL_SECONDS=str(STALL))
    with cs, HealthSampler(cs) as sampler:
        # 1. half the poison, then valid messages: all valid stored within 2 s.
        publish_all(topic, [p for _, p in first])
        batch = valid(org, prefix, "a", 20)
        publish_each([(t, payload) for _, t, payload in batch])
        took = wait_stored(cs, [sn for sn, _, _ in batch], timeout=2.0)
        cs.wait_health("dead_lettered", len(first))
        # 2. the rest while it is killed mid-stream: the persistent session redelivers.
        # Killed while 300 are being published; the persistent session holds what it did
        # not ack (Mosquitto queues at most 1,000 per session, so the rest comes later).
        flood, rest = [p for _, p in second[:300]], [p for _, p in second[300:]]
        publisher = threading.Thread(target=publish_all, args=(topic, flood))
        publisher.start()
        cs.wait_health_at_least("received", len(first) + len(batch) + 50)  # mid-flood
        cs.kill()
        publisher.join(60)
        cs.start()
        publish_all(topic, rest)
        batch2 = valid(org, prefix, "b", 20)
        publish_each([(t, payload) for _, t, payload in batch2])
        took2 = wait_stored(cs, [sn for sn, _, _ in batch2], timeout=2.0)

        def not_dead_lettered() -> list[tuple[str, bytes]]:
            have = {r["digest"] for r in query(db, "SELECT digest FROM mqtt_dead_letters")}
            return [(c, p[:80]) for c, p in poison if digest(topic, p) not in have]

        eventually(not_dead_lettered, accept=lambda missing: not missing, within=30,
                   what="every poison message dead-lettered")
        sampler.observe(2 * STALL)
        health = cs.health()
        assert cs.proc is not None and cs.proc.poll() is None
    sampler.assert_never_healthy_over_a_stall()
    assert health["status"] == "healthy" and health["unacked"] == 0, health
    rows = query(db, "SELECT digest, reason FROM mqtt_dead_letters")
    assert sorted(r["digest"] for r in rows) == sorted(digest(topic, p) for _, p in poison)
    assert all(r["reason"] for r in rows)
    stored = query(db, "SELECT robot_sn FROM mnt_robots_management")
    assert {r["robot_sn"] for r in stored} == {sn for sn, _, _ in batch + batch2}
    print(f"{len(poison)} poison messages in {len(classes)} classes; valid stored in "
          f"{took:.2f} s, after the restart in {took2:.2f} s; "
          f"{sum(s['status'] == 'degraded' for s in sampler.samples)} of "
          f"{len(sampler.samples)} health samples degraded")


def test_every_fault_class_is_generated() -> None:
    """The flood above draws from these; a class that cannot be drawn would go untested."""
    drawn = {name for name, _ in poison_payloads("o", "d", per_class=3)}
    assert drawn == set(FAULT_CLASSES)
