# ruff: noqa: F811  (pytest passes the imported ``ingest`` fixture by name)
"""AWS-shaped batches at the callback server (issue 27): an IoT Rule's batched HTTP
action in both modes, and the edge's batch frames over HTTP ingest and MQTT, each
element settled on its own (the per-element ingest contract)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bridge import frames
from bridge.transport import MqttSettings
from bridge.transport.memory import MemoryTransport
from tests.support.dbutil import query
from tests.support.waiting import eventually_async
from tests.test_ingest import Ingest, envelope, ingest  # noqa: F401  (the fixture)

FRAME_TOPIC = "org/acme/device/site-a/batch"


def outcomes(answer: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    return [(e["id"], e["outcome"], e.get("reason", "").split(":")[0])
            for e in answer["results"]]


async def test_a_same_topic_batch_of_ten_under_one_header(ingest: Ingest) -> None:
    """batchConfig without batchAcrossTopics: ten messages of one topic, the topic only
    in X-Mqtt-Topic; poison and another org's envelope are dead, the rest stored."""
    key = {"X-Callback-Token": ingest.acme_key, "X-Mqtt-Topic": "org/acme/device/R1/pose"}
    body: list[Any] = [envelope(i, type="notifyRobotPose", channel="pose",
                                data={"x": i, "y": 0}) for i in range(1, 8)]
    body += [envelope(8, ts="soon"), envelope(9, org="other"), ["not", "an", "object"]]
    r = await ingest.post(body, **key)
    assert r.status_code == 200, r.text
    assert outcomes(r.json()) == [
        *[(f"e{i}", "stored", "") for i in range(1, 8)],
        ("e8", "dead_lettered", "malformed"),
        ("e9", "dead_lettered", "inconsistent with its topic"),
        (None, "dead_lettered", "malformed")]
    logged = query(ingest.db, "SELECT topic FROM mqtt_message_log")
    assert {row["topic"] for row in logged} == {"org/acme/device/R1/pose"}
    assert len(logged) == 7 and len(ingest.dead()) == 3


async def test_across_topics_each_element_names_its_topic_and_the_header_is_ignored(
        ingest: Ingest) -> None:
    """batchAcrossTopics carries the headers of the last message added (here another
    org's): an element naming its own topic (``SELECT *, topic() AS topic``) is settled
    under that topic, and the foreign-org element under an org-scoped key is refused
    alone."""
    key = {"X-Callback-Token": ingest.acme_key,
           "X-Mqtt-Topic": "org/other/device/X1/status"}
    body = [{**envelope(i, device=f"R{i}", raw={"sn": f"R{i}"}),
             "topic": f"org/acme/device/R{i}/status"} for i in range(1, 9)]
    body.append({**envelope(9, v=7), "topic": "org/acme/device/R1/status"})
    body.append({**envelope(10, org="other", device="X1"),
                 "topic": "org/other/device/X1/status"})
    r = await ingest.post(body, **key)
    assert r.status_code == 200, r.text
    assert outcomes(r.json()) == [
        *[(f"e{i}", "stored", "") for i in range(1, 9)],
        ("e9", "dead_lettered", "malformed"),
        ("e10", "dead_lettered", "org not covered by the key")]
    for i in range(1, 9):
        assert await ingest.robot(f"R{i}") is not None
    assert await ingest.robot("X1") is None


def frame(*elements: Any) -> dict[str, Any]:
    return {"v": 1, "batch": list(elements)}


async def test_a_frame_of_good_and_poison_envelopes_over_http(ingest: Ingest) -> None:
    """A batch frame pushed by a rule on the gateway's batch topic: each element is an
    envelope of its own, the poison ones (bad, another gateway's) dead-lettered alone."""
    good = [envelope(i, device=f"R{i}", raw={"sn": f"R{i}"}) for i in range(1, 5)]
    body = frame(*good, envelope(5, ts=None), envelope(6, gateway="site-b"), 42)
    r = await ingest.post(body, **{"X-Mqtt-Topic": FRAME_TOPIC})
    assert r.status_code == 200, r.text
    assert outcomes(r.json()) == [
        *[(f"e{i}", "stored", "") for i in range(1, 5)],
        ("e5", "dead_lettered", "malformed"),
        ("e6", "dead_lettered", "inconsistent with its topic"),
        (None, "dead_lettered", "malformed")]
    topics = {row["topic"] for row in query(ingest.db, "SELECT topic FROM mqtt_message_log")}
    assert topics == {f"org/acme/device/R{i}/status" for i in range(1, 5)}
    # A frame inside a batchAcrossTopics array, next to a plain envelope, retried whole.
    arr = [{**frame(envelope(7, device="R7")), "topic": FRAME_TOPIC},
           {**envelope(8, device="R8"), "topic": "org/acme/device/R8/status"}]
    for _ in range(2):
        r = await ingest.post(arr)
        assert r.status_code == 200, r.text
    assert len(query(ingest.db, "SELECT id FROM mqtt_message_log")) == 6


async def test_a_replayed_message_is_logged_but_never_merged_into_state(
        ingest: Ingest) -> None:
    """History sent after the newest state (a drain): it is kept in the message log and
    does not move the robot back, even with a later robot time."""
    now = envelope(1)["ts"]
    r = await ingest.post(envelope(1, ts=now, data={"status": "working"}))
    assert r.json()["stored"] == 1
    r = await ingest.post(envelope(2, ts=now + 5, data={"status": "idle"}, replay=True))
    assert r.json()["stored"] == 1, r.text
    robot = await ingest.robot("R1")
    assert robot is not None and robot["status"] == "working", robot
    logged = query(ingest.db, "SELECT id, payload FROM mqtt_message_log ORDER BY id")
    assert [row["id"] for row in logged] == ["e1", "e2"]
    assert json.loads(logged[1]["payload"])["replay"] is True


async def test_a_frame_over_mqtt_is_unpacked_and_acked_once_settled(ingest: Ingest) -> None:
    """The consumer takes a frame from the broker, stores its good elements, dead-letters
    the poison one, and acknowledges the frame once all are settled."""
    url = ingest.server.settings.mqtt_url
    gw = MemoryTransport(MqttSettings.from_url(url, client_id="gw-frames"))
    good = [envelope(i, device=f"R{i}", type="notifyRobotPose", channel="pose",
                     raw={"sn": f"R{i}"}, data={"x": 1, "y": 2}) for i in range(1, 4)]
    payloads = [json.dumps(e).encode() for e in good] + [b'{"v":1,"id":"bad"}']
    [(count, packed)] = list(frames.pack(payloads))
    assert count == 4
    async with gw:
        await asyncio.wait_for(gw.publish(FRAME_TOPIC, packed, 1, False), 5)
        consumer = ingest.server.consumer
        await eventually_async(lambda: consumer.received and consumer.unacked == 0, within=5,
                               what="the frame received and acked")
    assert {r["id"] for r in query(ingest.db, "SELECT id FROM mqtt_message_log")} == \
        {"e1", "e2", "e3"}
    assert [d["reason"].split(":")[0] for d in ingest.dead()] == ["malformed"]
    assert consumer.unacked == 0
