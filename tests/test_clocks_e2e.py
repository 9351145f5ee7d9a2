"""Issue 24's clocks across the edge and the cloud: a gateway whose clock is an hour behind
(a fake clock in its webhook) among robots with correct clocks; the edge's envelopes merged
by the real store (SQLite)."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import generate_latest

from bridge.envelope import Envelope
from bridge.transport import InboundMessage
from callback_server.alerts.engine import _CLOCK_NOTE
from callback_server.store import open_store
from tests.test_edge_in_process import CODE, agent_and_watcher, next_on


def status(sn: str, state: str, ts: float, battery: int = 50) -> dict[str, object]:
    return {"callback_type": "notifyRobotStatus",
            "data": {"sn": sn, "run_state": state, "battery": battery,
                     "notify_timestamp": int(ts * 1000)}}


async def test_a_gateway_clock_an_hour_behind_is_reported_and_robot_states_still_move(
        tmp_path: Path) -> None:
    async with agent_and_watcher(tmp_path) as (agent, client, inbox), \
            open_store(f"sqlite:///{tmp_path / 'cloud.db'}") as store:
        agent.app.state.webhook.clock = lambda: time.time() - 3600
        robots = ("R1", "R2", "R3", "R4")
        for round_, state in enumerate(("ONLINE", "BUSY", "IDLE")):
            for sn in robots:
                sent = await client.post("/api/pudu/webhook", headers=CODE,
                                         json=status(sn, state, time.time() + round_))
                assert sent.status_code == 200, sent.text
            items: list[tuple[str, Envelope]] = []
            for sn in robots:
                message: InboundMessage = await next_on(inbox, f"/device/{sn}/status")
                items.append((message.topic, Envelope.from_json(message.payload)))
            await store.write_batch(items)
            rows = {sn: await store.get_robot(sn) for sn in robots}
            # the first round's first robots are judged against the wrong clock; by the
            # last round every robot's state has moved to what it sent
            if round_ == 2:
                assert {sn: r["status"] for sn, r in rows.items() if r} == {
                    sn: "idle" for sn in robots}
                assert all("ahead" not in " ".join(e.notes) for _, e in items)
        health = (await client.get("/api/pudu/webhook/health")).json()
        assert abs(health["gateway_clock_offset_s"] + 3600) < 60, health
        assert any("gateway clock" in r for r in health["reasons"])
        assert health["status"] == "degraded"
        agent.refresh_gauges()
        metrics = generate_latest(agent.metrics.registry).decode()
        line = next(m for m in metrics.splitlines()
                    if m.startswith("edge_gateway_clock_offset_seconds "))
        assert abs(float(line.split()[1]) + 3600) < 60


def counter(agent: object, name: str) -> float:
    registry = agent.metrics.registry  # type: ignore[attr-defined]
    return float(registry.get_sample_value(name) or 0.0)


async def test_on_a_site_of_two_or_one_robot_a_wrong_gateway_clock_blames_no_robot(
        tmp_path: Path) -> None:
    """Two robots agreeing against the gateway are two clocks against one: the gateway's
    is found wrong and their times used. One robot alone cannot tell whose clock is
    wrong: its messages still move its state, and no robot clock is blamed."""
    for robots in (("R1", "R2"), ("R1",)):
        site = tmp_path / str(len(robots))
        site.mkdir()
        async with agent_and_watcher(site) as (agent, client, inbox), \
                open_store(f"sqlite:///{site / 'cloud.db'}") as store:
            agent.app.state.webhook.clock = lambda: time.time() - 3600
            notes: list[str] = []
            for round_, state in enumerate(("ONLINE", "BUSY", "IDLE")):
                for sn in robots:
                    # the last with a field of its own noted (after the time's note)
                    sent = await client.post("/api/pudu/webhook", headers=CODE, json=status(
                        sn, state, time.time() + round_, battery=255 if round_ == 2 else 50))
                    assert sent.status_code == 200, sent.text
                    message = await next_on(inbox, f"/device/{sn}/status")
                    envelope = Envelope.from_json(message.payload)
                    notes += envelope.notes
                    await store.write_batch([(message.topic, envelope)])
                    assert (await store.get_robot(sn) or {}).get("status") == state.lower()
            assert not [n for n in notes if _CLOCK_NOTE.search(n)], notes
            battery_notes = [n for n in notes if n.startswith("data.battery")]
            assert len(battery_notes) == len(robots), notes
            notes = [n for n in notes if n not in battery_notes]
            health = (await client.get("/api/pudu/webhook/health")).json()
            if len(robots) == 2:
                assert abs(health["gateway_clock_offset_s"] + 3600) < 60, health
                assert health["status"] == "degraded"
                # only R1's first, before R2 was heard, could tell nothing
                assert len(notes) == 1 and "no other robot" in notes[0], notes
            else:
                assert health["gateway_clock_offset_s"] == 0, health
                assert len(notes) == 3 and all("no other robot" in n for n in notes), notes
            assert counter(agent, "edge_clock_skew_total") == 0


async def test_a_robot_clock_reset_to_1970_is_counted_once_on_the_edge(
        tmp_path: Path) -> None:
    async with agent_and_watcher(tmp_path) as (agent, client, inbox):
        now = time.time()
        for i, ts in enumerate((now, 5.0, 6.0, 978_307_200.0, now + 10, 7.0)):
            sent = await client.post("/api/pudu/webhook", headers=CODE,
                                     json=status("RZ", ("IDLE", "BUSY")[i % 2], ts))
            assert sent.status_code == 200, sent.text
            await next_on(inbox, "/device/RZ/status")
        # reset, stayed reset (1970, 2001), set right, reset again: two resets
        assert counter(agent, "edge_robot_clock_resets_total") == 2
        health = (await client.get("/api/pudu/webhook/health")).json()
        assert health["robot_clock_resets"] == 2
