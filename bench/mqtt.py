"""Driving the raw MQTT baseline processes and reading the broker's own counters."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.apps import child_env
from bench.procs import python_module

RAW = "bench.baselines.raw_mqtt"


def _run(*args: str, timeout: float = 600) -> dict[str, Any]:
    proc = subprocess.run(python_module(RAW, *args), capture_output=True, text=True,
                          env={**os.environ, **child_env()}, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"raw_mqtt {args[0]} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def create_session(port: int, topic_filter: str, client_id: str) -> None:
    """A persistent session subscribed to ``topic_filter``: the broker queues for it."""
    _run("subscribe", "--port", str(port), "--filter", topic_filter, "--client-id", client_id,
         "--session-only")


def forget_session(port: int, client_id: str) -> None:
    """End a persistent session (its shared subscriptions stop taking a share)."""
    _run("forget", "--port", str(port), "--client-id", client_id)


def publish(port: int, count: int, *, org: str, tag: str) -> dict[str, Any]:
    """Publish ``count`` envelopes at QoS 1, window 100; the publisher's own figures."""
    return _run("publish", "--port", str(port), "--count", str(count), "--org", org,
                "--tag", tag)


class Subscriber:
    """``raw_mqtt subscribe`` as a child process; ``result()`` once it counted enough."""

    def __init__(self, port: int, topic_filter: str, count: int, *, client_id: str = "",
                 persistent: bool = False, timeout: float = 300.0) -> None:
        argv = python_module(RAW, "subscribe", "--port", str(port), "--filter", topic_filter,
                             "--count", str(count), "--timeout", str(timeout))
        if client_id:
            argv += ["--client-id", client_id]
        if persistent:
            argv.append("--persistent")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **child_env()})
        self.timeout = timeout

    def wait_ready(self) -> Subscriber:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"subscriber did not start: {line}{self.proc.stderr.read()}"
                               if self.proc.stderr else line)
        return self

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=self.timeout + 30)
        if self.proc.returncode != 0:
            raise RuntimeError(f"subscriber failed: {err[-1500:]}")
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def sys_counter(port: int, topic: str = "$SYS/broker/publish/messages/received") -> float:
    """One of mosquitto's ``$SYS`` counters (retained, refreshed every ``sys_interval``)."""
    got: list[float] = []
    ready = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(float(msg.payload))
        ready.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sys-{time.monotonic_ns()}")
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=0)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        if not ready.wait(5):
            raise TimeoutError(f"no value on {topic}")
        return got[0]
    finally:
        client.disconnect()
        client.loop_stop()


def settled_counter(port: int, *, timeout: float = 30.0) -> float:
    """``sys_counter`` once it stopped moving (two reads 1.2 s apart agree)."""
    deadline = time.monotonic() + timeout
    value = sys_counter(port)
    while time.monotonic() < deadline:
        time.sleep(1.2)  # $SYS is refreshed every second (sys_interval 1)
        again = sys_counter(port)
        if again == value:
            return value
        value = again
    return value
