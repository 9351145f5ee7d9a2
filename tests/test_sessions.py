"""Console sessions (hash-only, expiring, bounded), the Origin rule, and the console hub's
coalescing and org scoping: pure logic, no broker or database."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any, cast

from bridge.envelope import Envelope
from callback_server import sessions as sessions_mod
from callback_server.console import ConsoleHub
from callback_server.console.hub import EVENTS_PENDING, ConsoleClient
from callback_server.keys import Principal
from callback_server.sessions import SessionStore, same_origin
from callback_server.store import Store
from tests.support.waiting import eventually_async

VIEWER_A = Principal("viewer_a", frozenset({"acme"}), "viewer")
ADMIN = Principal("admin", frozenset({"*"}), "admin")


def test_a_session_keeps_only_a_hash_and_expires() -> None:
    now = [1000.0]
    store = SessionStore(seconds=60, clock=lambda: now[0])
    sid = store.create(VIEWER_A)
    assert len(sid) >= 40
    assert store.lookup(sid) == VIEWER_A
    assert all(sid.encode() not in k and k != sid.encode() for k in store._by_hash)
    assert store.lookup(sid + "x") is None and store.lookup("") is None
    now[0] += 59.9
    assert store.lookup(sid) == VIEWER_A
    now[0] += 0.2
    assert store.lookup(sid) is None and len(store) == 0
    other = store.create(VIEWER_A)
    assert store.drop(other) and store.lookup(other) is None and not store.drop(other)


def test_sessions_are_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(sessions_mod, "MAX_SESSIONS", 3)
    store = SessionStore()
    ids = [store.create(VIEWER_A) for _ in range(5)]
    assert len(store) == 3
    assert [store.lookup(i) is not None for i in ids] == [False, False, True, True, True]


def test_one_key_signing_in_10000_times_leaves_another_keys_session_alive() -> None:
    store = SessionStore()
    admin = store.create(ADMIN)
    ids = [store.create(VIEWER_A) for _ in range(10_000)]
    assert store.lookup(admin) == ADMIN  # before the cap per key, it signed the admin out
    assert store.count("viewer_a") == sessions_mod.MAX_PER_KEY == len(store) - 1
    alive = [store.lookup(i) is not None for i in ids]
    cap = sessions_mod.MAX_PER_KEY
    assert alive == [False] * (10_000 - cap) + [True] * cap  # the key's newest are kept
    assert store.drop(admin) and store.count("admin") == 0


def test_the_overall_bound_takes_from_the_key_with_the_most(monkeypatch: Any) -> None:
    monkeypatch.setattr(sessions_mod, "MAX_SESSIONS", 4)
    store = SessionStore()
    admin = store.create(ADMIN)
    viewers = [store.create(VIEWER_A) for _ in range(3)]
    other = store.create(Principal("viewer_b", frozenset({"beta"}), "viewer"))
    assert len(store) == 4 and store.lookup(admin) == ADMIN and store.lookup(other)
    assert [store.lookup(i) is not None for i in viewers] == [False, True, True]


def test_same_origin() -> None:
    assert same_origin("http://127.0.0.1:3005", "127.0.0.1:3005")
    assert same_origin("https://Console.Example", "console.example")
    for origin, host in (("http://evil.example", "console.example"),
                         ("http://127.0.0.1:3006", "127.0.0.1:3005"),
                         ("null", "console.example"), (None, "console.example"),
                         ("", "console.example"), ("console.example", "console.example"),
                         ("ftp://console.example", "console.example"),
                         ("http://console.example", None)):
        assert not same_origin(origin, host), (origin, host)


def test_a_client_holds_the_newest_version_of_each_object_of_its_orgs() -> None:
    client = ConsoleClient(VIEWER_A)
    client.push("robots", [{"robot_sn": "A1", "org_id": "acme", "x": 1},
                           {"robot_sn": "B1", "org_id": "beta", "x": 1}])
    client.push("robots", [{"robot_sn": "A1", "org_id": "acme", "x": 2}])
    client.push("alerts", [{"id": "a", "org": "beta"}])
    assert client.wake.is_set()
    assert client.take() == {"robots": [{"robot_sn": "A1", "org_id": "acme", "x": 2}]}
    assert client.take() == {} and not client.wake.is_set()


class _Rows:
    def __init__(self) -> None:
        self.calls: list[set[tuple[str, str]]] = []

    async def get_robots_of(self, robots: Collection[tuple[str, str]],
                            ) -> list[dict[str, Any]]:
        self.calls.append(set(robots))
        return [{"robot_sn": sn, "org_id": org} for org, sn in sorted(robots)]


class _Env:
    def __init__(self, device: str) -> None:
        self.org = "acme" if device.startswith("A") else "beta"
        self.device = device
        self.channel = "pose"
        self.data: dict[str, Any] = {}


async def test_the_hub_reads_changes_once_per_tick_for_every_client() -> None:
    rows = _Rows()
    hub = ConsoleHub(cast(Store, rows), tick_seconds=0.05)
    hub.observe([("t", _Env("A1"))])  # type: ignore[list-item]
    assert rows.calls == []  # nobody watching: nothing queued
    clients = [hub.join(VIEWER_A) for _ in range(50)]
    admin = hub.join(ADMIN)
    runner = asyncio.create_task(hub.run())
    try:
        for _ in range(20):  # many messages, for the same robots, between two ticks
            hub.observe([("t", _Env("A1")), ("t", _Env("B1"))])  # type: ignore[list-item]
        await eventually_async(lambda: rows.calls, within=5, what="the hub's first tick")
        assert rows.calls == [{("acme", "A1"), ("beta", "B1")}]
        assert all(c is not None and [r["robot_sn"] for r in c.take()["robots"]] == ["A1"]
                   for c in clients)
        assert admin is not None and len(admin.take()["robots"]) == 2
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    full = ConsoleHub(cast(Store, rows), max_clients=1)
    assert full.join(VIEWER_A) is not None and full.join(VIEWER_A) is None


def fault(org: str, sn: str, i: int) -> tuple[str, Envelope]:
    data = {"event_id": f"e{i}", "event_level": "critical", "event_type": "Crash"}
    return ("t", Envelope(id=f"m{i}", type="robotErrorWarning", org=org, device=sn,
                          gateway=f"gw-{org}", ts=1_700_000_000 + i, received_at=1_700_000_001,
                          data=data, raw=dict(data), channel="event"))


async def test_events_and_gateways_reach_only_their_orgs_and_a_slow_client_is_bounded(
        ) -> None:
    hub = ConsoleHub(cast(Store, _Rows()), tick_seconds=0.01)
    viewer, admin = hub.join(VIEWER_A), hub.join(ADMIN)
    assert viewer is not None and admin is not None
    runner = asyncio.create_task(hub.run())
    try:
        hub.observe([fault("acme", "A1", i) for i in range(EVENTS_PENDING + 50)])
        hub.observe([fault("beta", "B1", 0)])
        hub.on_gateway({"org_id": "acme", "gateway_id": "gw", "state": "online"})
        hub.on_gateway({"org_id": "acme", "gateway_id": "gw", "outbox_depth": 3})
        hub.on_gateway({"org_id": "beta", "gateway_id": "gw", "state": "online"})
        # all of it was queued before the first tick, which hands it out in one go
        await asyncio.wait_for(asyncio.gather(viewer.wake.wait(), admin.wake.wait()), 5)
        mine = viewer.take()
        # the newest EVENTS_PENDING of its org, oldest first, in the read API's shape
        assert [e["event_id"] for e in mine["events"]] == [
            f"e{i}" for i in range(50, EVENTS_PENDING + 50)]
        assert mine["events"][-1]["event_level"] == "critical"
        assert mine["events"][-1]["task_time"] == "2023-11-14T22:17:29.000Z"
        assert mine["gateways"] == [{"org_id": "acme", "gateway_id": "gw", "outbox_depth": 3}]
        everything = admin.take()
        assert {e["org_id"] for e in everything["events"]} == {"acme", "beta"}
        assert len(everything["gateways"]) == 2
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
