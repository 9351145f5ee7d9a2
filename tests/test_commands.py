"""Command / response round trips cloud -> edge -> cloud, and presence (real broker)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.commands import Command, CommandExecutor, Response
from bridge.router import MessageRouter
from bridge.topic import TopicScheme
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.paho import PahoTransport
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
BROKER = "mqtt://127.0.0.1:1883"
TOKEN = "operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_gateways(server: ServiceProcess, want: dict[str, str], timeout: float = 15) -> None:
    def states() -> dict[str, str]:
        gws = httpx.get(server.url + "/gateways", headers=server.auth).json()["items"]
        return {g["gateway_id"]: g["state"] for g in gws}

    eventually(states, accept=lambda seen: all(seen.get(k) == v for k, v in want.items()),
               within=timeout, what=f"gateways {want}")


async def test_round_trips_for_every_builtin_under_concurrency(tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p, PROXY_TOKEN=TOKEN) as server, \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwa", TOPIC_PREFIX=p) as gwa, \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwb", TOPIC_PREFIX=p):
        wait_gateways(server, {"gwa": "online", "gwb": "online"})
        async with httpx.AsyncClient() as c:
            r = await c.post(gwa.url + "/api/pudu/webhook", headers={"CallbackCode": "test-code"},
                             json={"callback_type": "robotStatus",
                                   "data": {"sn": "R1", "run_status": "ONLINE",
                                            "timestamp": 1700000000}})
            assert r.status_code == 200
        commands: list[tuple[str, str, dict[str, Any]]] = []
        builtins: list[tuple[str, dict[str, Any]]] = [
                    ("ping", {}), ("get_status", {}), ("get_robots", {}),
                    ("flush_outbox", {"timeout": 5}), ("set_log_level", {"level": "debug"})]
        for i in range(20):
            name, args = builtins[i % len(builtins)]
            commands.append(("gwa" if i % 2 else "gwb", name, args))
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=20) as c:
            answers = await asyncio.gather(*(
                c.post(f"/devices/{gw}/commands", json={"command": name, "args": args})
                for gw, name, args in commands
            ))
            unknown = await c.post("/devices/gwa/commands", json={"command": "self_destruct"})
            no_token = await c.post("/devices/gwa/commands", json={"command": "ping"},
                                    headers={"Authorization": "Bearer nope"})
            silent = await c.post("/devices/gwa/commands",
                                  json={"command": "ping", "timeout": 0.5,
                                        "org_id": "nobody-home"})
    ids = set()
    for (gw, name, _), r in zip(commands, answers, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "success", body
        ids.add(body["messageId"])
        if name == "ping":
            assert body["result"]["gateway_id"] == gw  # answered by the gateway asked
        if name == "get_status":
            assert body["result"]["gateway_id"] == gw and "outbox_depth" in body["result"]
        if name == "get_robots" and gw == "gwa":
            assert [r["sn"] for r in body["result"]["items"]] == ["R1"]
            assert body["result"]["next_cursor"] is None
        if name == "flush_outbox":
            assert body["result"]["flushed"] is True
    assert len(ids) == 20  # every answer correlated to its own command
    assert unknown.status_code == 200 and unknown.json()["status"] == "error"
    assert "unknown command" in unknown.json()["error"]
    assert no_token.status_code == 401
    assert silent.status_code == 504


def test_killed_edge_agent_shows_offline_via_last_will(tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p) as server:
        agent = edge_agent(tmp_path, BROKER, org="acme", gateway="gwk", TOPIC_PREFIX=p).start()
        try:
            wait_gateways(server, {"gwk": "online"})
        finally:
            agent.kill()
        wait_gateways(server, {"gwk": "offline"})


async def test_redelivered_command_runs_once_and_is_answered_again() -> None:
    scheme = TopicScheme("acme", f"t{uuid.uuid4().hex[:8]}")
    settings = MqttSettings.from_url(BROKER, client_id=f"gw-{uuid.uuid4().hex[:6]}",
                                     clean_start=True)
    runs = 0

    async def count(args: dict[str, Any]) -> int:
        nonlocal runs
        runs += 1
        return runs

    responses: asyncio.Queue[Response] = asyncio.Queue()
    async with PahoTransport(settings) as transport, MessageRouter(transport) as router:
        executor = CommandExecutor(transport, scheme, "gw")
        executor.register("count", count)
        await router.attach(executor.command_topic, executor.on_message)
        await router.attach(executor.response_topic,
                            lambda m: responses.put_nowait(Response.from_json(m.payload)))
        command = Command("count", {})
        for _ in range(2):  # the same messageId twice: a QoS 1 redelivery
            executor.on_message(InboundMessage(executor.command_topic, command.to_json(), 1))
        first = await asyncio.wait_for(responses.get(), 5)
        second = await asyncio.wait_for(responses.get(), 5)
    assert runs == 1
    assert first == second == Response(command.message_id, "success", result=1)
    assert json.loads(first.to_json())["messageId"] == command.message_id


async def test_malformed_commands_with_an_id_are_answered_with_an_error() -> None:
    scheme = TopicScheme("acme", f"t{uuid.uuid4().hex[:8]}")
    settings = MqttSettings.from_url(BROKER, client_id=f"gw-{uuid.uuid4().hex[:6]}",
                                     clean_start=True)
    responses: asyncio.Queue[Response] = asyncio.Queue()
    deep = "[" * 5000 + "]" * 5000
    bad = [b'{"messageId": "m1", "command": "ping", "args": ' + deep.encode() + b"}",
           b'{"messageId": "m2", "command": "ping", "args": [1]}',
           b'{"messageId": "m3", "command": 7}',
           b'{"messageId": "m4", "command": "ping", "args": {"x": NaN}}',
           b"[" * 100_000, b'{"command": "ping"}', b"\xff"]  # m1 (too deep to read) and
    # the last three have no id anyone could read: logged, not answered
    async with PahoTransport(settings) as transport, MessageRouter(transport) as router:
        executor = CommandExecutor(transport, scheme, "gw")
        executor.register("ping", lambda args: asyncio.sleep(0, "pong"))
        await router.attach(executor.response_topic,
                            lambda m: responses.put_nowait(Response.from_json(m.payload)))
        for payload in bad:
            executor.on_message(InboundMessage(executor.command_topic, payload, 1))
        got = [await asyncio.wait_for(responses.get(), 5) for _ in range(3)]
        executor.on_message(InboundMessage(executor.command_topic,
                                           Command("ping", message_id="m5").to_json(), 1))
        last = await asyncio.wait_for(responses.get(), 5)
    by_id = {r.message_id: r for r in got}
    assert sorted(by_id) == ["m2", "m3", "m4"]
    assert all(by_id[m].status == "error" and "malformed" in (by_id[m].error or "")
               for m in ("m2", "m3"))
    assert by_id["m4"].status == "success"  # NaN became null: args {"x": null} is valid
    assert last == Response("m5", "success", result="pong")  # still answering
