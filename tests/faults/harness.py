"""Fault-injection harness: sustained Pudu-like traffic and the one invariant.

The load behaves like Pudu: each callback is retried (same body, same TraceId) up to
3 times when it is not answered 200. The invariant checked after every fault:
every callback answered 200 is in the database exactly once (events) or is superseded
only by a newer one (robot state), and nothing that was never sent is there.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.dbutil import query
from tests.support.waiting import eventually

ROBOTS = 4


@dataclass
class Load:
    """Posts pose + event callbacks in a thread until stopped; records the outcomes."""

    url: str
    code: str = "test-code"
    retries: int = 3
    retry_delay: float = 0.2
    attempted: dict[int, dict[str, Any]] = field(default_factory=dict)
    accepted: set[int] = field(default_factory=set)
    refused: dict[int, int] = field(default_factory=dict)  # seq -> last status (e.g. 503)
    retry_after: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._progress = threading.Condition()

    @staticmethod
    def body(seq: int) -> dict[str, Any]:
        sn = f"F{seq % ROBOTS}"
        if seq % 3 == 0:
            return {"callback_type": "robotErrorWarning",
                    "data": {"sn": sn, "error_level": "Error", "error_type": "Fault",
                             "error_detail": f"d{seq}", "error_id": f"e{seq}",
                             "timestamp": 1_700_000_000 + seq}}
        return {"callback_type": "notifyRobotPose",
                "data": {"sn": sn, "x": float(seq), "y": 1.0, "yaw": 0.0,
                         "timestamp": 1_700_000_000 + seq,
                         "notify_timestamp": (1_700_000_000 + seq) * 1000}}

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def wait_accepted(self, count: int, timeout: float = 30) -> None:
        """Block until ``count`` more callbacks than now were answered 200."""
        with self._progress:
            target = len(self.accepted) + count
            if not self._progress.wait_for(lambda: len(self.accepted) >= target, timeout):
                raise TimeoutError(f"only {len(self.accepted)} of {target} accepted")

    def wait_refused(self, status: int, timeout: float = 30) -> None:
        """Block until some callback was answered ``status``."""
        with self._progress:
            if not self._progress.wait_for(lambda: status in self.refused.values(), timeout):
                raise TimeoutError(f"no {status} answer within {timeout}s")

    def _run(self) -> None:
        seq = 0
        with httpx.Client(base_url=self.url, timeout=5.0,
                          headers={"CallbackCode": self.code}) as client:
            while not self._stop.is_set():
                seq += 1
                body = self.body(seq)
                self.attempted[seq] = body
                payload = json.dumps(body).encode()
                for attempt in range(1 + self.retries):
                    status = self._post(client, payload, f"trace-{seq}")
                    if status == 200:
                        with self._progress:
                            self.accepted.add(seq)
                            self._progress.notify_all()
                        break
                    with self._progress:
                        self.refused[seq] = status
                        self._progress.notify_all()
                    if attempt < self.retries and self._stop.wait(self.retry_delay):
                        break

    def _post(self, client: httpx.Client, payload: bytes, trace: str) -> int:
        try:
            r = client.post("/api/pudu/webhook", content=payload, headers={"TraceId": trace})
        except httpx.TransportError:
            return 0
        if r.status_code == 503 and "retry-after" in r.headers:
            self.retry_after.add(r.headers["retry-after"])
        return r.status_code


def check_invariant(db_url: str, load: Load) -> dict[str, int]:
    """Accepted events exactly once, robot state the newest accepted (or newer attempted)."""
    events = query(db_url, "SELECT robot_sn, event_id FROM mnt_robot_events")
    stored = [int(e["event_id"][1:]) for e in events]
    assert len(stored) == len(set(stored)), "an event was stored twice"
    accepted_events = {s for s in load.accepted if s % 3 == 0}
    missing = accepted_events - set(stored)
    assert not missing, f"{len(missing)} accepted events missing, e.g. {sorted(missing)[:5]}"
    never_sent = set(stored) - set(load.attempted)
    assert not never_sent, f"events that were never sent: {sorted(never_sent)[:5]}"
    robots = {r["robot_sn"]: r for r in query(db_url, "SELECT * FROM mnt_robots_management")}
    for i in range(ROBOTS):
        sn = f"F{i}"
        poses = [s for s in load.accepted if s % 3 and s % ROBOTS == i]
        if not poses:
            continue
        newest = max(poses)
        got = int(float(robots[sn]["x"]))
        # newer than the newest accepted is allowed only if it was sent (its 200 lost)
        assert got == newest or (got > newest and got in load.attempted), (sn, got, newest)
    return {"accepted": len(load.accepted), "events": len(stored),
            "refused": len(set(load.refused) - load.accepted)}


def wait_rows(db_url: str, load: Load, timeout: float = 60) -> dict[str, int]:
    """Wait until the invariant holds (the pipeline drains), then return its figures."""
    # An AssertionError is "not drained yet"; any other error: tables not created yet, the
    # database restarting. The failure shows the last one.
    return eventually(lambda: check_invariant(db_url, load), accept=lambda _: True,
                      ignoring=(Exception,), within=timeout, what="the invariant holding")
