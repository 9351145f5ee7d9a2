"""Pudu webhooks posted straight to the callback server (no gateway): the callback codes,
the same answers as the edge agent's, and the same rows as the edge path writes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.errors import ConfigError
from callback_server import settings as cb_config
from callback_server.config_checks import problems
from callback_server.pudu_webhook import CLOUD_GATEWAY_ID, CallbackCodes
from callback_server.service import CallbackServer
from edge_agent import settings as edge_config
from edge_agent.service import EdgeAgent
from tests.support.dbutil import query
from tests.support.procs import free_port
from tests.support.waiting import eventually_async

SAMPLES = Path(__file__).parent / "samples" / "pudu"
CODES = {"acme": "acme-code-0123456789abcdef0123456", "beta": "beta-code-0123456789abcdef0123456"}


# -- the codes --------------------------------------------------------------------------------
def codes(value: str | None = None, file: str | None = None) -> CallbackCodes:
    env = {"CALLBACK_CODES": value} if value is not None else {}
    if file is not None:
        env["CALLBACK_CODES_FILE"] = file
    return CallbackCodes.load(cb_config.load(None, env))


def test_each_code_names_its_org_from_the_env_and_the_file(tmp_path: Path) -> None:
    file = tmp_path / "codes.yaml"
    file.write_text("c3: gamma\n12345: delta\n")
    found = codes(" c1=acme , c2=beta,", str(file))
    assert len(found) == 4
    assert [found.org_of(c) for c in (b"c1", b"c2", b"c3", b"12345")] == [
        "acme", "beta", "gamma", "delta"]
    for wrong in (b"", b"c", b"c1 ", b"C1", b"c1c2"):
        assert found.org_of(wrong) is None


def test_the_code_list_is_split_as_every_list_setting_is() -> None:
    """CALLBACK_CODES is a list setting: commas and/or spaces between entries, as
    bridge.service.settings_loader.split_list reads every other one."""
    found = codes("c1=acme c2=beta,\tc3=gamma")
    assert [found.org_of(c) for c in (b"c1", b"c2", b"c3")] == ["acme", "beta", "gamma"]


@pytest.mark.parametrize("value", ["c1", "c1=", "=acme", "c1=acme,c1=beta", "c1=a/b",
                                   "c1=a+b"])
def test_a_bad_code_list_refuses_to_start_without_showing_a_code(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        codes(value)
    assert "CALLBACK_CODES" in str(caught.value) and "c1" not in str(caught.value)


def test_a_bad_code_file_refuses_to_start(tmp_path: Path) -> None:
    file = tmp_path / "codes.yaml"
    file.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="CALLBACK_CODES_FILE"):
        codes(file=str(file))


# -- the same answers and rows as the edge path --------------------------------------------
@dataclass
class Paths:
    edges: dict[str, httpx.AsyncClient]  # per org: the edge agent's webhook
    cloud: httpx.AsyncClient  # the callback server taking webhooks itself
    via_edge: CallbackServer  # the callback server behind the edges (broker)
    via_edge_db: str
    cloud_db: str


@asynccontextmanager
async def both_paths(tmp_path: Path) -> AsyncIterator[Paths]:
    broker = f"b{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        edge_db, cloud_db = (f"sqlite:///{tmp_path / name}" for name in ("edge.db", "cloud.db"))
        behind = await stack.enter_async_context(CallbackServer(cb_config.load(None, {
            "MQTT_URL": f"mqtt://{broker}", "MQTT_BACKEND": "memory",
            "DATABASE_URL": edge_db})))
        edges = {}
        for org, code in CODES.items():
            agent = await stack.enter_async_context(EdgeAgent(edge_config.load(None, {
                "PUDU_CALLBACK_CODE": code, "MQTT_URL": f"mqtt://{broker}",
                "MQTT_BACKEND": "memory", "ORG_ID": org, "GATEWAY_ID": f"gw-{org}",
                "OUTBOX_PATH": str(tmp_path / f"outbox-{org}.db")})))
            edges[org] = await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=agent.app), base_url="http://gw"))
        cloud_settings = cb_config.load(None, {
            "MQTT_URL": f"mqtt://c{broker}", "MQTT_BACKEND": "memory",
            "DATABASE_URL": cloud_db,
            "CALLBACK_CODES": ",".join(f"{c}={o}" for o, c in CODES.items())})
        cloud = await stack.enter_async_context(CallbackServer(cloud_settings.model_copy(
            update={"max_body_bytes": 64 * 1024})))  # the edge's default
        client = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cloud.app), base_url="http://cb"))
        yield Paths(edges, client, behind, edge_db, cloud_db)


def workload(org: str) -> list[dict[str, Any]]:
    """Every sample callback (each robot its own sn, per org), a shop-level one and an
    undocumented type."""
    bodies = []
    for i, path in enumerate(sorted(SAMPLES.rglob("*.json"))):
        body = json.loads(path.read_text())
        sn = f"{org}-{i}"
        body["data"]["sn"] = sn
        if isinstance(body["data"].get("extend_info"), dict):
            body["data"]["extend_info"]["sn"] = sn
        bodies.append(body)
    # (its own shop per org: the same body from two orgs has one message id, and envelope
    # ids are scoped by org only once the store does so)
    bodies.append({"callback_type": "mapElementChange", "data": {"shop_id": f"{org}-7",
                                                                 "map_name": "F1"}})
    bodies.append({"callback_type": "notifySomethingNew", "data": {"sn": f"{org}-new",
                                                                   "level": 3}})
    return bodies


def logged(url: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: json.loads(r["payload"])
            for r in query(url, "SELECT id, payload FROM mqtt_message_log")}


ROBOT_FACTS = ("org_id", "status", "battery_level", "charge_state", "is_charging",
               "move_state", "x", "y", "yaw", "map_name")


async def test_webhooks_of_two_orgs_land_in_the_database_as_the_edge_path_writes_them(
        tmp_path: Path) -> None:
    async with both_paths(tmp_path) as paths:
        sent = 0
        for org, code in CODES.items():
            for body in workload(org):
                at_edge = await paths.edges[org].post("/api/pudu/webhook", json=body,
                                                      headers={"CallbackCode": code})
                at_cloud = await paths.cloud.post("/api/pudu/webhook", json=body,
                                                  headers={"CallbackCode": code})
                assert at_edge.status_code == at_cloud.status_code == 200, at_cloud.text
                edge_answer, cloud_answer = at_edge.json(), at_cloud.json()
                assert edge_answer.keys() == cloud_answer.keys()
                assert edge_answer["data"]["message_id"] == cloud_answer["data"]["message_id"]
                assert cloud_answer["message"] == edge_answer["message"]
                sent += 1
        await eventually_async(lambda: paths.via_edge.writer.stored >= sent)

    edge_rows, cloud_rows = logged(paths.via_edge_db), logged(paths.cloud_db)
    assert edge_rows.keys() == cloud_rows.keys() and len(cloud_rows) == sent
    for mid, edge_env in edge_rows.items():
        cloud_env = cloud_rows[mid]
        assert cloud_env["gateway"] == CLOUD_GATEWAY_ID
        if edge_env["device"] == edge_env["gateway"]:  # shop-level: on the gateway's topic
            assert cloud_env["device"] == CLOUD_GATEWAY_ID
        for name in ("type", "channel", "org", "data", "raw", "notes"):
            assert cloud_env.get(name) == edge_env.get(name), (mid, name)
        assert abs(cloud_env["ts"] - edge_env["ts"]) < 5  # robot time, or receipt time

    def facts(url: str) -> dict[str, tuple[Any, ...]]:
        rows = query(url, "SELECT * FROM mnt_robots_management")
        return {r["robot_sn"]: tuple(r.get(c) for c in ROBOT_FACTS) for r in rows}

    robots = facts(paths.cloud_db)
    assert robots == facts(paths.via_edge_db)
    assert {sn.split("-")[0] for sn in robots} == set(CODES)
    assert all(fact[0] == sn.split("-")[0] for sn, fact in robots.items())
    events = "SELECT robot_sn, event_id, event_level, event_type FROM mnt_robot_events " \
             "ORDER BY robot_sn, event_id"
    assert query(paths.cloud_db, events) == query(paths.via_edge_db, events)
    assert query(paths.cloud_db, events)


async def test_refusals_are_the_edge_agents_answers(tmp_path: Path) -> None:
    bodies: list[tuple[dict[str, str], bytes]] = [
        ({}, b'{"callback_type": "robotStatus", "data": {"sn": "R1"}}'),
        ({"CallbackCode": "wrong"}, b'{"callback_type": "robotStatus", "data": {"sn": "R1"}}'),
        ({"CallbackCode": CODES["acme"]}, b"not json"),
        ({"CallbackCode": CODES["acme"]}, b'{"callback_type": "robotStatus"}'),
        ({"CallbackCode": CODES["acme"]}, b'{"callback_type": 5, "data": {"sn": "R1"}}'),
        ({"CallbackCode": CODES["acme"]}, b'{"callback_type": "notifyRobotPower", '
                                          b'"data": {"sn": "R/1", "power": 5}}'),
        ({"CallbackCode": CODES["acme"]}, b"[" * 5000),
        ({"CallbackCode": CODES["acme"]}, b'{"callback_type": "robotStatus", "data": '
                                          b'{"sn": "R1", "pad": "' + b"x" * 70_000 + b'"}}'),
    ]
    async with both_paths(tmp_path) as paths:
        for headers, raw in bodies:
            at_edge = await paths.edges["acme"].post("/api/pudu/webhook", content=raw,
                                                     headers=headers)
            at_cloud = await paths.cloud.post("/api/pudu/webhook", content=raw,
                                              headers=headers)
            assert at_cloud.status_code == at_edge.status_code != 200, raw
            edge_error, cloud_error = at_edge.json(), at_cloud.json()
            assert cloud_error["message"] == edge_error["message"], raw
            assert cloud_error.get("field") == edge_error.get("field"), raw
        edge_health = (await paths.edges["acme"].get("/api/pudu/webhook/health")).json()
        cloud_health = (await paths.cloud.get("/api/pudu/webhook/health")).json()
    assert cloud_health["status"] == "healthy" and cloud_health["callback_codes"] == 2
    assert {"status", "timestamp", "service"} <= edge_health.keys() & cloud_health.keys()
    assert abs(cloud_health["timestamp"] - time.time()) < 60
    assert not any(code in json.dumps(cloud_health) for code in CODES.values())



def test_check_config_takes_a_gateway_less_deployment_and_names_a_bad_code_list(
        tmp_path: Path) -> None:
    base = {"MQTT_BACKEND": "memory", "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}"}
    assert problems(cb_config.load(None, {**base, "CALLBACK_CODES": "c1=acme"})) == []
    found = problems(cb_config.load(None, {**base, "CALLBACK_CODES": "c1=acme,c1=beta"}))
    assert len(found) == 1 and "two orgs" in found[0] and "c1" not in found[0]
    # memory without callback codes is still a test's broker, not a service's
    assert "MQTT_BACKEND" in " ".join(problems(cb_config.load(None, base)))


# -- health: the three forms, on the path Pudu registers -------------------------------------
HEALTH = "/api/pudu/webhook/health"


async def forms(client: httpx.AsyncClient) -> dict[str, int]:
    return {q: (await client.get(HEALTH + q)).status_code
            for q in ("", "?ready=1", "?strict=1")}


async def test_health_answers_ready_and_strict_on_the_path_pudu_registers(
        tmp_path: Path) -> None:
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://h{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}", "CALLBACK_CODES": "c1=acme"})
    server = CallbackServer(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                 base_url="http://cb") as client:
        before = await forms(client)
        async with server:
            during = await forms(client)
            body = (await client.get(HEALTH)).json()
            bad = await client.get(HEALTH + "?strict=maybe")
    assert before == {"": 200, "?ready=1": 503, "?strict=1": 503}
    assert during == {"": 200, "?ready=1": 200, "?strict=1": 200}
    assert (body["status"], body["ready"], body["not_ready"]) == ("healthy", True, [])
    assert bad.status_code == 422 and bad.json()["field"] == "strict"


async def test_health_with_the_database_away_fails_ready_and_strict(tmp_path: Path) -> None:
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://h{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": f"mysql://root@127.0.0.1:{free_port()}/away",  # nobody listens
        "CALLBACK_CODES": "c1=acme"})
    async with CallbackServer(settings) as server, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=server.app), base_url="http://cb") as client:
        answered = await forms(client)
        body = (await client.get(HEALTH + "?strict=1")).json()
        callback_health = (await client.get("/callback/health?strict=1")).status_code
    # a curl -f monitor and a load balancer on Pudu's path see what /callback/health says
    assert answered == {"": 200, "?ready=1": 503, "?strict=1": 503}
    assert callback_health == 503
    assert (body["status"], body["database_ok"]) == ("degraded", False)
    assert "database unreachable" in body["not_ready"]
