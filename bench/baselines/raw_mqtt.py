"""Raw MQTT baseline: paho QoS 1 publisher and subscriber, no application code.

``python -m bench.baselines.raw_mqtt publish --port P --count N --org O`` publishes N
envelopes (the same ones the edge would produce from the sample mix) at QoS 1 with an
in-flight window of 100 (what AWS IoT allows, and where paho is fastest: docs/measured.md),
checking every return code, and prints ``{"published", "elapsed", "rate"}`` as JSON.

``python -m bench.baselines.raw_mqtt subscribe --port P --filter F --count N`` prints
``ready`` once subscribed, then counts deliveries until N unique ones arrived and prints
JSON: rate between the first and the last delivery, duplicates, and per-device order
violations (robot time ``ts`` going backwards). ``--session-only`` only creates a
persistent session (so a broker queues for it) and exits; ``forget --client-id C``
ends a session (clean start, expiry 0) so a shared group stops queueing for it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.samples import envelopes
from bridge.envelope import REPLAY_PREFIX

SESSION_EXPIRY = 3600
RECEIVE_MAXIMUM = 1000  # what the callback server asks for (2 x batch_max)


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=mqtt.MQTTv5)


def _connect(client: mqtt.Client, port: int, *, clean: bool) -> None:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean else SESSION_EXPIRY
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    client.connect("127.0.0.1", port, 30, clean_start=clean, properties=props)


def publish(port: int, count: int, org: str, window: int, tag: str | None) -> dict[str, Any]:
    messages = list(envelopes(count, org=org, tag=tag))
    slots = threading.Semaphore(window)
    acked = 0
    done = threading.Event()
    connected = threading.Event()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                   props: Any) -> None:
        nonlocal acked
        acked += 1
        slots.release()
        if acked >= count:
            done.set()

    client = _client(f"raw-pub-{time.monotonic_ns()}")
    client.max_inflight_messages_set(window)
    client.on_publish = on_publish
    client.on_connect = lambda *a: connected.set()
    _connect(client, port, clean=True)
    client.loop_start()
    if not connected.wait(10):
        raise TimeoutError("raw publisher could not connect")
    start = time.perf_counter()
    for topic, payload, _ in messages:
        slots.acquire()
        info = client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"paho refused publish: {mqtt.error_string(info.rc)}")
    if count and not done.wait(300):
        raise TimeoutError(f"only {acked} of {count} publishes acknowledged")
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return {"published": count, "elapsed": elapsed, "rate": count / elapsed if elapsed else 0}


class Counter:
    """Counts deliveries, duplicates (by envelope id) and order violations per robot and
    channel (per topic) among the messages the cloud merges into state: history sent
    after a newer message (``"replay": true``, a drain newest state first) is counted
    apart, as the cloud logs it and never merges it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.received = 0
        self.seen: set[bytes] = set()
        self.duplicates = 0
        self.violations = 0
        self.replayed = 0
        self.last_ts: dict[str, float] = {}
        self.first = 0.0
        self.last = 0.0
        self.done = threading.Event()

    def on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if not self.received:
            self.first = now
        self.received += 1
        self.last = now
        payload = bytes(msg.payload)
        # Byte search instead of json.loads, which would make this baseline the
        # bottleneck; the envelope's own keys are written before data/raw.
        at_id = payload.find(b'"id":"')
        if at_id >= 0:
            mid = payload[at_id + 6:payload.index(b'"', at_id + 6)]
            if mid in self.seen:
                self.duplicates += 1
                return
            self.seen.add(mid)
            at = payload.find(b'"ts":')
            if payload.startswith(REPLAY_PREFIX):
                self.replayed += 1
            elif at >= 0:
                end = payload.index(b",", at)
                ts = float(payload[at + 5:end])
                if ts < self.last_ts.get(msg.topic, 0.0):
                    self.violations += 1
                self.last_ts[msg.topic] = ts
        if len(self.seen) >= self.target:
            self.done.set()

    def result(self) -> dict[str, Any]:
        elapsed = self.last - self.first
        return {
            "received": self.received, "unique": len(self.seen),
            "duplicates": self.duplicates, "order_violations": self.violations,
            "replayed": self.replayed, "topics": len(self.last_ts), "first": self.first,
            "last": self.last, "elapsed": elapsed,
            "rate": (len(self.seen) - 1) / elapsed if elapsed > 0 else 0.0,
        }


def subscribe(port: int, topic_filter: str, client_id: str, count: int, *,
              persistent: bool, session_only: bool, timeout: float) -> dict[str, Any]:
    counter = Counter(count)
    subscribed = threading.Event()
    client = _client(client_id)
    client.on_message = counter.on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
    _connect(client, port, clean=not persistent)
    client.loop_start()
    if not subscribed.wait(10):
        raise TimeoutError(f"could not subscribe to {topic_filter}")
    if session_only:
        client.disconnect()
        client.loop_stop()
        return {"session": client_id}
    print("ready", flush=True)
    counter.done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return counter.result()


def forget(port: int, client_id: str) -> dict[str, Any]:
    """Connect with a clean start and session expiry 0: the broker drops the session."""
    connected = threading.Event()
    client = _client(client_id)
    client.on_connect = lambda *a: connected.set()
    _connect(client, port, clean=True)
    client.loop_start()
    if not connected.wait(10):
        raise TimeoutError(f"could not connect as {client_id}")
    client.disconnect()
    client.loop_stop()
    return {"forgotten": client_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--count", type=int, required=True)
    pub.add_argument("--org", default="raw")
    pub.add_argument("--window", type=int, default=100)
    pub.add_argument("--tag")
    s = sub.add_parser("subscribe")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--filter", required=True)
    s.add_argument("--client-id", default="")
    s.add_argument("--count", type=int, default=0)
    s.add_argument("--persistent", action="store_true")
    s.add_argument("--session-only", action="store_true")
    s.add_argument("--timeout", type=float, default=300.0)
    f = sub.add_parser("forget")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--client-id", required=True)
    args = parser.parse_args()
    if args.cmd == "forget":
        out = forget(args.port, args.client_id)
    elif args.cmd == "publish":
        out = publish(args.port, args.count, args.org, args.window, args.tag)
    else:
        client_id = args.client_id or f"raw-sub-{time.monotonic_ns()}"
        out = subscribe(args.port, args.filter, client_id, args.count,
                        persistent=args.persistent or args.session_only,
                        session_only=args.session_only, timeout=args.timeout)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
