"""pudu.* robot commands: cloud -> gateway -> stub Pudu API, exactly once per messageId."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.pudu_stub import KEY, SECRET, StubServer, serve_stub
from tests.support.services import callback_server, edge_agent
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
TOKEN = "operator-token"
SHOP = "12345"


@pytest.fixture
def stub() -> Iterator[StubServer]:
    yield from serve_stub()


def env(stub: StubServer) -> dict[str, str]:
    return {"PUDU_API_URL": stub.url, "PUDU_API_KEY": KEY, "PUDU_API_SECRET": SECRET,
            "PUDU_SHOP_IDS": SHOP, "PUDU_POLL_INTERVAL": "0", "PUDU_API_TIMEOUT_SECONDS": "2"}


def test_cloud_robot_commands_reach_the_stub_with_the_right_path_and_body(
        tmp_path: Path, stub: StubServer) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    stub.stub.add_robot("K1", SHOP)
    stub.stub.maps[(SHOP, "floor-2")] = "code-42"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p, PROXY_TOKEN=TOKEN) as server, \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwk", TOPIC_PREFIX=p,
                       **env(stub)) as agent:
        r = httpx.post(agent.url + "/api/pudu/webhook", headers={"CallbackCode": "test-code"},
                       json={"callback_type": "robotStatus",
                             "data": {"sn": "K1", "run_status": "ONLINE",
                                      "timestamp": int(time.time())}})
        assert r.status_code == 200
        eventually(lambda: httpx.get(server.url + "/robots/K1", headers=server.auth).status_code
                   == 200, within=20, what="K1 stored")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=30) as c:
            answers = {name: c.post("/robots/K1/commands", json={
                "command": name, "args": args, "timeout": 15}).json()
                for name, args in (("pudu.recharge", {}),
                                   ("pudu.switch_map", {"map_name": "floor-2"}),
                                   ("pudu.position_reporting", {"interval": 1, "times": 10}))}
            unknown_map = c.post("/robots/K1/commands", json={
                "command": "pudu.switch_map", "args": {"map_name": "nope"}}).json()
            no_robot = c.post("/robots/NOPE/commands", json={"command": "pudu.recharge"})
            no_token = c.post("/robots/K1/commands", json={"command": "pudu.recharge"},
                              headers={"Authorization": "Bearer wrong"})
    assert all(a["status"] == "success" for a in answers.values()), answers
    assert answers["pudu.recharge"]["result"]["taskId"] == "t-recharge"
    assert answers["pudu.recharge"]["gateway_id"] == "gwk"
    assert [c.query for c in stub.stub.calls_to("/v2/recharge")] == [{"sn": "K1"}]
    assert [c.body for c in stub.stub.calls_to("/v1/switch_map")] == [
        {"sn": "K1", "mapInfo": {"mapName": "floor-2", "mapCode": "code-42"}}]
    assert [c.body for c in stub.stub.calls_to("/v1/position_command")] == [
        {"sn": "K1", "payload": {"interval": 1, "times": 10}}]
    assert unknown_map["status"] == "error" and "MAP_NOT_FOUND" in unknown_map["error"]
    assert no_robot.status_code == 404 and no_token.status_code == 401
    assert stub.stub.unauthorized == []


def test_command_without_a_key_is_a_clear_error(tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    with edge_agent(tmp_path, BROKER, org="acme", gateway="gwn", TOPIC_PREFIX=p) as agent:
        answers = _send(p, "gwn", [("m-nokey", "pudu.recharge", {"sn": "X"})], agent)
    assert answers[0]["status"] == "error" and "no Pudu API key" in answers[0]["error"]


def test_a_robot_unknown_to_the_key_is_a_clear_error(tmp_path: Path,
                                                      stub: StubServer) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    stub.stub.add_robot("K1", SHOP)
    with edge_agent(tmp_path, BROKER, org="acme", gateway="gwu", TOPIC_PREFIX=p,
                    **env(stub)) as agent:
        answers = _send(p, "gwu", [
            ("m-unk-1", "pudu.recharge", {"sn": "NOPE"}),
            ("m-unk-2", "pudu.position_reporting", {"sn": "NOPE", "interval": 1, "times": 2}),
            ("m-unk-3", "pudu.switch_map", {"sn": "NOPE", "map_name": "floor-2"})], agent)
    by_id = {a["messageId"]: a for a in answers}
    for message_id in ("m-unk-1", "m-unk-2", "m-unk-3"):
        answer = by_id[message_id]
        assert answer["status"] == "error", answer
        assert "robot NOPE is unknown to this API key" in answer["error"], answer
    assert "ROBOT_NOT_FOUND" in by_id["m-unk-1"]["error"]  # Pudu's own word, kept


def _send(prefix: str, gateway: str, commands: list[tuple[str, str, dict[str, Any]]],
          agent: Any, want: int | None = None) -> list[dict[str, Any]]:
    """Publish commands (messageId, command, args) on the gateway's topic; its answers."""
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    subacked = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda c, u, m: got.put(json.loads(m.payload))
    client.on_subscribe = lambda *_: subacked.set()
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        base = f"{prefix}/org/acme/device/{gateway}"
        client.subscribe(base + "/response", qos=1)
        assert subacked.wait(10), "no SUBACK"  # else an early answer could be missed
        # A first start answers health before its broker connection: the command
        # subscription goes out once the broker accepts the connection, and a command published
        # before that is dropped (no session holds the filter yet).
        eventually(lambda: agent.health()["broker_connected"], within=20,
                   what="edge agent connected to the broker")
        for message_id, name, args in commands:
            info = client.publish(base + "/command", json.dumps(
                {"messageId": message_id, "command": name, "args": args}), qos=1)
            info.wait_for_publish(5)
        answers = [got.get(timeout=20) for _ in range(want or len(commands))]
    finally:
        client.loop_stop()
        client.disconnect()
    return answers


def test_redelivered_commands_call_the_api_once_also_after_a_restart(
        tmp_path: Path, stub: StubServer) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    stub.stub.add_robot("D1", SHOP)
    cmd = ("m-pos-1", "pudu.position_reporting", {"sn": "D1", "interval": 2, "times": 5})
    recharge = ("m-rch-1", "pudu.recharge", {"sn": "D1"})
    agent = edge_agent(tmp_path, BROKER, org="acme", gateway="gwd", TOPIC_PREFIX=p,
                       **env(stub)).start()
    try:
        before = _send(p, "gwd", [cmd, cmd, recharge, recharge], agent)
    finally:
        agent.stop()
    agent.start()
    try:
        after = _send(p, "gwd", [cmd, recharge], agent)
    finally:
        agent.stop()
    assert len(stub.stub.calls_to("/v1/position_command")) == 1
    assert len(stub.stub.calls_to("/v2/recharge")) == 1
    for answers in (before, after):
        for a in answers:
            assert a["status"] == "success", a
    pos = [a for a in before + after if a["messageId"] == "m-pos-1"]
    assert len(pos) == 3 and all(a == pos[0] for a in pos)
