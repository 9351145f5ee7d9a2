"""The seed design of the edge: FastAPI publishing each callback with paho at QoS 1.

``python -m bench.baselines.naive_forward --port 8080 --mqtt-port 1883``. The request
is answered once ``publish()`` returned, as the seed did: nothing is stored, and the
return code is not checked, so what paho refuses (docs/measured.md: beyond 65,535 queued
messages, ``MQTT_ERR_QUEUE_SIZE``) is lost while the caller got 200. The bench counts
what reached the broker from the broker's own ``$SYS`` counters.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import paho.mqtt.client as mqtt
import uvicorn
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel

from bench.samples import WEBHOOK_PATH


class Callback(BaseModel):
    callback_type: str
    data: dict[str, Any]


def create_app(client: mqtt.Client, org: str) -> FastAPI:
    app = FastAPI()

    @app.post(WEBHOOK_PATH)
    async def webhook(callback: Callback) -> dict[str, Any]:
        sn = str(callback.data.get("sn") or "unknown")
        client.publish(f"org/{org}/device/{sn}/{callback.callback_type}",
                       json.dumps(callback.model_dump()), qos=1)
        return {"status": "success"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--org", default="naive")
    args = parser.parse_args()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="naive-forward")
    client.connect("127.0.0.1", args.mqtt_port, 30)
    client.loop_start()
    uvicorn.run(create_app(client, args.org), host="127.0.0.1", port=args.port, workers=1,
                access_log=False, log_level="warning", loop="uvloop", http="httptools",
                lifespan="off")


if __name__ == "__main__":
    main()
