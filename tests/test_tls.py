"""mqtts:// with mutual TLS, as a gateway talks to AWS IoT Core, against a TLS Mosquitto.

The broker has a TLS listener that requires a client certificate from the trusted CA,
and a plain loopback listener for the test's own subscriber.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.mqtt_probe import Probe
from tests.support.procs import free_port
from tests.support.services import edge_agent
from tests.support.tls_certs import CertPair, Pki, TlsBroker
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration
CODE = {"CallbackCode": "test-code"}
BODY = {"callback_type": "robotStatus",
        "data": {"sn": "TLS1", "run_status": "ONLINE", "timestamp": 1_700_000_000}}


def tls_env(ca: Path, pair: CertPair) -> dict[str, str]:
    return {"MQTT_CA_FILE": str(ca), "MQTT_CERT_FILE": str(pair.cert),
            "MQTT_KEY_FILE": str(pair.key)}


def wait_for_log(log: Path, needle: str, timeout: float = 15) -> None:
    eventually(log.read_text, accept=lambda text: needle in text, within=timeout,
               what=f"{needle!r} logged")


def test_callbacks_reach_the_broker_over_mutual_tls(
        tmp_path: Path, pki: Pki, tls_broker: TlsBroker) -> None:
    with edge_agent(tmp_path, tls_broker.tls_url, org="acme", gateway="gw-tls",
                    **tls_env(pki.trusted.cert, pki.client)) as agent, \
            Probe(tls_broker.plain_url, "org/acme/device/TLS1/status") as probe:
        assert httpx.post(agent.url + "/api/pudu/webhook", json=BODY, headers=CODE,
                          ).status_code == 200
        assert probe.wait_for(1)[0].topic == "org/acme/device/TLS1/status"
        assert agent.health()["broker_connected"] is True


@pytest.mark.parametrize("who", ["client not signed by the broker's CA",
                                 "broker not signed by our CA"])
def test_an_untrusted_peer_is_refused_with_a_warning_and_callbacks_wait(
        tmp_path: Path, pki: Pki, tls_broker: TlsBroker, who: str) -> None:
    env = (tls_env(pki.trusted.cert, pki.rogue_client) if who.startswith("client")
           else tls_env(pki.rogue.cert, pki.client))
    with edge_agent(tmp_path, tls_broker.tls_url, org="acme", gateway="gw-tls", **env) as agent:
        # TLS 1.3: a refused client certificate shows on the first read, after the handshake
        stage = "connection" if who.startswith("client") else "handshake"
        wait_for_log(agent.log_path, f"MQTT TLS {stage}")
        r = httpx.post(agent.url + "/api/pudu/webhook", json=BODY, headers=CODE)
        assert r.status_code == 200  # durable in the outbox, waiting for a broker
        health = agent.health()
        assert (health["broker_connected"], health["outbox_depth"]) == (False, 1)


def test_missing_or_mismatched_tls_files_stop_the_start_with_the_file_named(
        tmp_path: Path, pki: Pki, tls_broker: TlsBroker) -> None:
    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent", "run"], capture_output=True, text=True,
            timeout=30, env={"PATH": "/usr/bin:/bin", "PUDU_CALLBACK_CODE": "c",
                             "MQTT_URL": tls_broker.tls_url, "EDGE_HTTP_PORT": str(free_port()),
                             "OUTBOX_PATH": str(tmp_path / "o.db"), **env})

    missing = run(**{**tls_env(pki.trusted.cert, pki.client), "MQTT_KEY_FILE": "/nope.key"})
    assert missing.returncode == 1
    assert "/nope.key does not exist or is not readable" in missing.stderr
    # a key that is not the certificate's: only loading them together tells
    mismatched = run(**{**tls_env(pki.trusted.cert, pki.client),
                        "MQTT_KEY_FILE": str(pki.rogue_client.key)})
    assert mismatched.returncode == 1
    assert "cannot use the MQTT TLS files" in mismatched.stderr
