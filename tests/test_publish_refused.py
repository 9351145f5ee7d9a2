"""A broker that refuses one robot's topic for good must not hold up the rest.

A private Mosquitto with an ACL denies one device's subtree; MQTT 5 clients then get a
PUBACK with 0x87 "Not authorized" for it (checked against mosquitto 2.0.11).
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.mqtt_probe import Probe, publish_once
from tests.support.procs import MosquittoProcess
from tests.support.services import edge_agent

pytestmark = pytest.mark.integration
CODE = {"CallbackCode": "test-code"}


def status(sn: str, ts: int, run_status: str = "ONLINE") -> dict[str, object]:
    return {"callback_type": "robotStatus",
            "data": {"sn": sn, "run_status": run_status, "timestamp": ts}}


def test_refused_topic_is_set_aside_then_requeued_after_the_policy_is_fixed(
        tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\ntopic deny org/acme/device/BAD/#\n")
    broker = MosquittoProcess(tmp_path / "broker", extra=[f"acl_file {acl}"]).start()
    try:
        with edge_agent(tmp_path, broker.url, org="acme") as agent, \
                Probe(broker.url, "org/acme/device/+/status") as probe, \
                httpx.Client(base_url=agent.url, headers=CODE) as http:
            # The refused entry is first in the outbox: everything else queues behind it.
            bodies = [status("BAD", 1_700_000_000)] + [
                status("GOOD", 1_700_000_001 + i) for i in range(5)]
            for body in bodies:
                assert http.post("/api/pudu/webhook", json=body).status_code == 200
            good = probe.wait_for(5)
            assert [m.topic for m in good] == ["org/acme/device/GOOD/status"] * 5
            agent.wait_health("outbox_depth", 0)
            assert agent.health()["outbox_rejected"] == 1
            metrics = httpx.get(agent.admin_url + "/metrics").text
            assert "edge_outbox_rejected 1.0" in metrics

            # Fix the policy (mosquitto re-reads acl_file on SIGHUP), then ask the gateway.
            acl.write_text("topic readwrite #\n")
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)
            message_id = uuid.uuid4().hex
            with Probe(broker.url, "org/acme/device/gw1/response") as responses, \
                    Probe(broker.url, "org/acme/device/BAD/status") as bad:
                publish_once(broker.url, "org/acme/device/gw1/command", json.dumps(
                    {"messageId": message_id, "command": "requeue_rejected", "args": {}}))
                answer = json.loads(responses.wait_for(1)[0].payload)
                assert answer["messageId"] == message_id
                assert answer["status"] == "success"
                assert answer["result"]["requeued"] == 1
                arrived = json.loads(bad.wait_for(1)[0].payload)
            assert arrived["device"] == "BAD"
            assert arrived["ts"] == 1_700_000_000
            agent.wait_health("outbox_depth", 0)
            assert agent.health()["outbox_rejected"] == 0
    finally:
        broker.stop()

