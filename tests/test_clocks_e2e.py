"""Issue 24's clocks across the edge and the cloud: a gateway whose clock is an hour behind
(a fake clock in its webhook) among robots with correct clocks; the edge's envelopes merged
by the real store (SQLite)."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import generate_latest

from bridge.envelope import Envelope
from bridge.transport import InboundMessage
from callback_server.store import open_store
from tests.test_edge_in_process import CODE, agent_and_watcher, next_on


def status(sn: str, state: str, ts: float) -> dict[str, object]:
    return {"callback_type": "notifyRobotStatus",
            "data": {"sn": sn, "run_state": state, "battery": 50,
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
