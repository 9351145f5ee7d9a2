"""Echo baselines: parse the JSON body, answer 200 (``python -m bench.baselines.echo``).

``starlette``: a bare Starlette route. ``fastapi``: FastAPI with a pydantic body model,
the way a webhook is usually written. Both under uvicorn with one worker, uvloop and
httptools, access log off (docs/measured.md: it costs ~25%), like the edge agent.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.samples import WEBHOOK_PATH


async def _starlette_echo(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    return JSONResponse({"status": "success", "callback_type": body.get("callback_type")})


def starlette_app() -> Starlette:
    return Starlette(routes=[Route(WEBHOOK_PATH, _starlette_echo, methods=["POST"])])


class Callback(BaseModel):
    """A Pudu callback as a typical FastAPI webhook declares it."""

    callback_type: str
    data: dict[str, Any]


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post(WEBHOOK_PATH)
    async def webhook(callback: Callback) -> dict[str, Any]:
        return {"status": "success", "callback_type": callback.callback_type}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["starlette", "fastapi"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = starlette_app() if args.kind == "starlette" else fastapi_app()
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, access_log=False,
                log_level="warning", loop="uvloop", http="httptools", lifespan="off")


if __name__ == "__main__":
    main()
