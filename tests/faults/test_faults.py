"""One fault per test under sustained traffic; then the invariant (harness.py)."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.faults.harness import Load, wait_rows
from tests.support.dbutil import query, scratch_mysql_database
from tests.support.mariadb_proc import MariadbProcess
from tests.support.procs import MosquittoProcess
from tests.support.services import ServiceProcess, callback_server, edge_agent

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    broker: MosquittoProcess
    db_url: str
    server: ServiceProcess
    edge: ServiceProcess


@pytest.fixture
def mysql_url() -> Iterator[str]:
    with scratch_mysql_database() as url:
        yield url


def start_stack(tmp: Path, broker: MosquittoProcess, db_url: str, **edge_env: str) -> Stack:
    p = f"t{uuid.uuid4().hex[:8]}"
    server = callback_server(tmp, broker.url, db_url, TOPIC_PREFIX=p).start()
    edge = edge_agent(tmp, broker.url, org="acme", TOPIC_PREFIX=p, **edge_env).start()
    return Stack(broker, db_url, server, edge)


@pytest.fixture
def stack(tmp_path: Path, mosquitto: MosquittoProcess, mysql_url: str) -> Iterator[Stack]:
    s = start_stack(tmp_path, mosquitto, mysql_url)
    yield s
    s.edge.stop()
    s.server.stop()


def test_broker_stopped_and_restarted_under_load(stack: Stack) -> None:
    load = Load(stack.edge.url).start()
    try:
        load.wait_accepted(100)
        stack.broker.stop()
        load.wait_accepted(150)  # answered 200 from the outbox while the broker is away
        stack.broker.start()
        load.wait_accepted(100)
    finally:
        load.stop()
    figures = wait_rows(stack.db_url, load)
    assert figures["accepted"] >= 350


def test_broker_away_longer_than_the_outbox_bound(tmp_path: Path, mosquitto: MosquittoProcess,
                                                  mysql_url: str) -> None:
    stack = start_stack(tmp_path, mosquitto, mysql_url, OUTBOX_MAX_ENTRIES="120")
    load = Load(stack.edge.url, retries=0).start()
    try:
        load.wait_accepted(50)
        stack.broker.stop()
        # poses are compacted to the newest per robot; then events are refused with 503
        load.wait_refused(503)
        assert load.retry_after == {"5"}
        health = stack.edge.health()
        assert health["outbox_depth"] == 120
        stack.broker.start()
        load.wait_accepted(50)
    finally:
        load.stop()
    try:
        wait_rows(stack.db_url, load)
    finally:
        stack.edge.stop()
        stack.server.stop()


def test_edge_agent_killed_under_load(stack: Stack) -> None:
    load = Load(stack.edge.url).start()
    try:
        load.wait_accepted(150)
        stack.edge.kill()
        stack.edge.start()  # same port, same outbox file
        load.wait_accepted(150)
    finally:
        load.stop()
    wait_rows(stack.db_url, load)


def test_callback_server_killed_under_load(stack: Stack) -> None:
    load = Load(stack.edge.url).start()
    try:
        load.wait_accepted(150)
        stack.server.kill()
        load.wait_accepted(100)
        stack.server.start()  # same client id: its persistent session is waiting
        load.wait_accepted(100)
    finally:
        load.stop()
    wait_rows(stack.db_url, load)


def test_database_stopped_and_started_under_load(tmp_path: Path,
                                                 mosquitto: MosquittoProcess) -> None:
    with MariadbProcess(tmp_path / "db") as db:
        stack = start_stack(tmp_path, mosquitto, db.url)
        load = Load(stack.edge.url).start()
        try:
            load.wait_accepted(150)
            db.stop()
            load.wait_accepted(150)
            assert stack.server.health()["status"] == "degraded"
            db.start()
            load.wait_accepted(100)
        finally:
            load.stop()
        try:
            wait_rows(db.url, load)
        finally:
            stack.edge.stop()
            stack.server.stop()


def test_duplicates_and_out_of_order_at_scale(stack: Stack) -> None:
    """Pudu retries racing each other, shuffled order, then a full MQTT replay."""
    load = Load(stack.edge.url)
    seqs = list(range(1, 601))
    random.Random(11).shuffle(seqs)
    copies = [s for s in seqs for _ in range(3)]  # every callback delivered 3 times
    random.Random(12).shuffle(copies)

    local = threading.local()

    def send(seq: int) -> int:
        if not hasattr(local, "client"):  # one keep-alive client per sender thread
            local.client = httpx.Client(base_url=stack.edge.url, timeout=10)
        body = json.dumps(Load.body(seq)).encode()
        r = local.client.post("/api/pudu/webhook", content=body,
                              headers={"CallbackCode": "test-code", "TraceId": f"t{seq}"})
        return int(r.status_code)

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, copies))
    assert set(statuses) == {200}
    load.attempted = {s: Load.body(s) for s in seqs}
    load.accepted = set(seqs)
    wait_rows(stack.db_url, load)
    # now replay everything the broker carried, as after an outage with QoS 1 redelivery
    rows = query(stack.db_url, "SELECT topic, payload FROM mqtt_message_log")
    assert len(rows) == 600
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", stack.broker.port)
    client.loop_start()
    try:
        for r in reversed(rows):
            client.publish(r["topic"], r["payload"], qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    wait_rows(stack.db_url, load)
    assert query(stack.db_url, "SELECT COUNT(*) AS n FROM mqtt_message_log")[0]["n"] == 600
