"""Hostile input: property tests for normalisation and topics; schema-driven fuzzing of
both apps' OpenAPI (no 5xx, no crash, no secret in any response or log line)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import InputError, TopicError
from bridge.http.error_boundary import status_for
from bridge.pudu.normalize import DOCUMENTED_TYPES, normalize
from bridge.topic import Topic, TopicFilter
from tests.support.hostile import hostile_bodies
from tests.support.mqtt_probe import Probe
from tests.support.services import ServiceProcess, callback_server, edge_agent
from tests.test_strictjson import strict_loads

CODE = "edge-secret-code-0123456789abcdef"
TOKEN = "proxy-secret-token-fedcba9876543210"
RULE_TOKEN = "rule-secret-token-0011223344556677"
SECRETS = (CODE, TOKEN, RULE_TOKEN)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)
callback_types = st.sampled_from(DOCUMENTED_TYPES) | st.text(max_size=12)
datas = st.fixed_dictionaries(
    {},
    optional={
        "sn": st.text(max_size=12) | st.integers(),
        "timestamp": st.integers(0, 2**45) | st.text(max_size=5),
        "notify_timestamp": st.integers(0, 2**45),
        "battery": json_values, "power": json_values, "x": json_values, "y": json_values,
        "run_state": json_values, "error_level": json_values, "error_id": json_values,
        "extend_info": json_values, "charge_state": json_values,
    },
)


@given(st.one_of(json_values, st.fixed_dictionaries({"callback_type": callback_types,
                                                      "data": datas | json_values})))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_normalize_only_ever_raises_input_error(body: Any) -> None:
    try:
        n = normalize(body, received_at=1_700_000_000.0)
    except InputError as exc:
        assert status_for(exc) in (400, 422) and exc.message
        return
    assert n.channel and "/" not in (n.device_id or "")
    assert 0 <= n.ts < 1e11  # always seconds
    json.dumps(n.data)  # the envelope can always be serialised


@given(st.integers(1_000_000_000_000, 99_999_999_999_999), st.sampled_from(DOCUMENTED_TYPES))
def test_millisecond_timestamps_become_seconds(ms: int, ctype: str) -> None:
    n = normalize({"callback_type": ctype, "data": {"sn": "A", "timestamp": ms,
                                                    "shop_id": 1}}, received_at=1e11)
    assert n.ts == pytest.approx(ms / 1000)


@given(st.sampled_from(["ONLINE", "online", "Online", "oNlInE"]),
       st.sampled_from(["robotStatus", "ROBOTSTATUS", "robotstatus"]))
def test_values_and_types_are_case_insensitive(status: str, ctype: str) -> None:
    n = normalize({"callback_type": ctype, "data": {"sn": "A", "run_status": status}},
                  received_at=1.0)
    assert (n.callback_type, n.channel, n.data["status"]) == ("robotStatus", "status", "online")


levels = st.text(alphabet="abcXYZ019_-. $", min_size=1, max_size=6)


@given(st.lists(levels, min_size=1, max_size=6))
def test_filter_properties(parts: list[str]) -> None:
    name = "/".join(parts)
    topic = Topic(name)
    assert TopicFilter(name).matches(topic)
    plus = "/".join(["+", *parts[1:]])
    # §4.7.2: wildcards at the first level never match $-topics
    assert TopicFilter(plus).matches(topic) is (not name.startswith("$"))
    assert TopicFilter("#").matches(topic) is (not name.startswith("$"))
    assert TopicFilter(name + "/#").matches(topic)  # "a/#" matches "a" itself


@given(st.text(max_size=30))
def test_filter_parsing_only_raises_topic_error(text: str) -> None:
    with contextlib.suppress(TopicError):
        TopicFilter(text)


# -- schema-driven fuzzing against the real processes ------------------------------------------
@pytest.fixture(scope="module")
def edge_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("fuzz-edge")
    with edge_agent(tmp, "mqtt://127.0.0.1:1883", org=f"fz{uuid.uuid4().hex[:6]}", code=CODE,
                    PROXY_TOKEN=TOKEN, TOPIC_PREFIX="fuzz") as agent:
        yield agent
    assert_no_secret_logged(agent.log_path)


@pytest.fixture(scope="module")
def callback_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("fuzz-cb")
    with callback_server(tmp, "mqtt://127.0.0.1:1883", f"sqlite:///{tmp / 'cb.db'}",
                         TOPIC_PREFIX="fuzz", PROXY_TOKEN=TOKEN, CALLBACK_TOKEN=RULE_TOKEN,
                         COMMAND_TIMEOUT_MAX="0.2") as server:
        yield server
    assert_no_secret_logged(server.log_path)


def assert_no_secret_logged(log: Path) -> None:
    text = log.read_text()
    for secret in SECRETS:
        assert secret not in text, f"a secret appears in {log.name}"


def fuzz(base_url: str, headers: dict[str, str], examples: int,
         schema_url: str | None = None) -> int:
    """Every operation of the app's own OpenAPI schema, with generated requests."""
    schema = schemathesis.openapi.from_url(schema_url or base_url + "/openapi.json")
    sent = 0
    for result in schema.get_all_operations():
        sent += fuzz_operation(result.ok(), base_url, headers, examples)  # type: ignore[union-attr]
    return sent


def fuzz_operation(operation: Any, base_url: str, headers: dict[str, str],
                   examples: int) -> int:
    """Generated requests for one operation; returns how many were sent.

    A 5xx passes only where the operation documents it (a command's 504 timeout, the
    webhook's 503 when the outbox is full): those are answers, not failures.
    """
    documented = {int(code) for code in operation.definition.raw.get("responses", {})
                  if code.isdigit()}
    calls = 0

    @given(operation.as_strategy())
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        assert response.status_code < 500 or response.status_code in documented, (
            case.method, case.path, response.status_code, response.text[:300])
        for secret in SECRETS:
            assert secret not in response.text

    run()
    return calls


def test_edge_agent_api_never_fails(edge_proc: ServiceProcess) -> None:
    # The edge serves its docs on the admin listener only; they describe the webhook too.
    assert httpx.get(edge_proc.url + "/openapi.json").status_code == 404
    assert fuzz(edge_proc.url, {"CallbackCode": CODE}, examples=60,
                schema_url=edge_proc.admin_url + "/openapi.json") > 60


def test_callback_server_api_never_fails(callback_proc: ServiceProcess) -> None:
    headers = {"X-Callback-Token": RULE_TOKEN, "Authorization": f"Bearer {TOKEN}"}
    assert fuzz(callback_proc.url, headers, examples=25) > 100


# -- body-level mutations: deep nesting, huge numbers, NaN, duplicate keys, bad bytes ------
# "power" first: the mutations replace the body's first "1", so they land in a number
# value (NaN, 1e400, 400 digits, deep nesting), not in the sn "R1".
CALLBACK_BODY = {"callback_type": "notifyRobotPower",
                 "data": {"power": 1, "sn": "R1", "charge_state": "idle"}}
NOT_JSON_NUMBERS = ("NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" * 400,
                    "123456789012345678901234567890")


def mutate_posts(base_url: str, path: str, headers: dict[str, str], base: dict[str, Any],
                 documented: tuple[int, ...] = ()) -> int:
    """POST generated hostile bodies; every answer is < 500 (or documented) and in the one
    error shape; returns how many were sent."""
    sent = 0

    @given(hostile_bodies(base))
    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(body: bytes) -> None:
        nonlocal sent
        sent += 1
        r = httpx.post(base_url + path, content=body, timeout=10,
                       headers={**headers, "Content-Type": "application/json"})
        assert r.status_code < 500 or r.status_code in documented, (path, r.status_code, r.text)
        if r.status_code >= 400:
            shape = r.json()
            assert shape["status"] == "error" and shape["message"], shape
            assert isinstance(shape["timestamp"], int)
            assert set(shape) <= {"status", "message", "timestamp", "field"}, shape

    run()
    return sent


@pytest.mark.integration  # the agent publishes to the shared Mosquitto
def test_edge_webhook_survives_body_mutations(edge_proc: ServiceProcess) -> None:
    org = edge_proc.env["ORG_ID"]
    with Probe("mqtt://127.0.0.1:1883", f"fuzz/org/{org}/device/+/power") as probe:
        assert mutate_posts(edge_proc.url, "/api/pudu/webhook", {"CallbackCode": CODE},
                            CALLBACK_BODY) >= 80
        # Each number JSON cannot carry, as the power of a valid callback: answered 200
        # and published as strict JSON whose notes say what was changed.
        text = json.dumps(CALLBACK_BODY, separators=(",", ":"))
        for i, literal in enumerate(NOT_JSON_NUMBERS):
            body = text.replace('"power":1', f'"power":{literal}').replace("R1", f"L{i}")
            r = httpx.post(edge_proc.url + "/api/pudu/webhook", content=body,
                           headers={"CallbackCode": CODE}, timeout=10)
            assert r.status_code == 200, (literal, r.text)
        wanted = {f"/device/L{i}/power" for i in range(len(NOT_JSON_NUMBERS))}
        probe.wait_until(lambda seen: not wanted - {m.topic[m.topic.index("/device/"):]
                                                   for m in seen}, "all published", timeout=10)
    envelopes = [strict_loads(m.payload) for m in probe.messages]  # raises on NaN/Infinity
    for env in envelopes:
        if env["raw"].get("power", 0) is None:
            assert any(n.startswith("data.power: ") for n in env["notes"]), env
    nulled = [e for e in envelopes if e["device"].startswith("L")]
    assert len(nulled) == len(NOT_JSON_NUMBERS)
    assert all(e["raw"]["power"] is None and e["notes"] for e in nulled), nulled
    assert edge_proc.proc is not None and edge_proc.proc.poll() is None


def test_edge_admin_proxy_survives_body_mutations(edge_proc: ServiceProcess) -> None:
    admin = f"http://127.0.0.1:{edge_proc.env['EDGE_ADMIN_PORT']}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    topic = f"fuzz/org/{edge_proc.env['ORG_ID']}/device/x/y"
    for path, base in (("/mqtt/publish", {"topic": topic, "payload": {"n": 1}, "qos": 1}),
                       ("/mqtt/subscribe", {"topic": topic, "qos": 1}),
                       ("/mqtt/unsubscribe", {"topic": topic, "id": "1"})):
        assert mutate_posts(admin, path, auth, base, documented=(503, 504)) >= 80
    assert edge_proc.proc is not None and edge_proc.proc.poll() is None


def test_callback_server_survives_body_mutations(callback_proc: ServiceProcess) -> None:
    headers = {"X-Callback-Token": RULE_TOKEN, "Authorization": f"Bearer {TOKEN}"}
    envelope = {"v": 1, "id": "m1", "type": "notifyRobotPower", "org": "acme", "device": "R1",
                "ts": 1700000001, "data": {"battery_level": 1}, "raw": {}}
    for path, base, documented in (
            ("/callback/messages", envelope, (503,)),
            ("/devices/gw1/commands", {"command": "ping", "args": {"n": 1}, "timeout": 0.1,
                                       "org_id": "acme"}, (504,)),
            ("/mqtt/publish", {"topic": "fuzz/org/a/device/b/c", "payload": [1], "qos": 0},
             (503, 504))):
        assert mutate_posts(callback_proc.url, path, headers, base, documented) >= 80
    assert callback_proc.proc is not None and callback_proc.proc.poll() is None
