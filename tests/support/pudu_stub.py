"""A stub of the Pudu Open API: a small ASGI app run as a real uvicorn server on a free port.

It checks every request as docs/pudu.md, "API 2" says Pudu (Tencent's gateway) does,
independently of the client's signing module: ``x-date`` present and within 900 s,
``Content-MD5`` empty on GET and base64 of the body's hex MD5 on POST, the literal
Accept/Content-Type, the key, and the HMAC-SHA1 signature over the decoded query; 401
otherwise. It pages its robot list and error log, and can be told to answer 429, 500,
a business error or to stall, per path, a given number of times.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import uvicorn

from tests.support.procs import free_port
from tests.support.waiting import eventually

KEY, SECRET = "stub-key", "stub-secret"
MAX_SKEW = 900


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class Fault:
    path: str      # a substring of the spec path and query (``path?query``)
    kind: str      # "429" | "500" | "business" | "stall"
    times: int = 1


@dataclass
class PuduStub:
    """The fleet it serves and what it was asked; mutate from the test thread freely."""

    key: str = KEY
    secret: str = SECRET
    robots: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    maps: dict[tuple[str, str], str] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    stall_seconds: float = 30.0
    calls: list[Call] = field(default_factory=list)
    unauthorized: list[str] = field(default_factory=list)
    snake: bool = False  # emit status in snake_case (third-party spelling)
    success: str = "SUCCESS"  # the ``message`` of a successful reply ("ok" is seen live)
    counts_as_text: bool = False  # page ``count``/``total`` as strings
    #: Answer at most this many items per page, whatever ``limit`` asked (an undocumented
    #: server maximum, as the log endpoints have).
    page_cap: int | None = None
    #: Added to the true ``count``/``total`` of successive paged replies, in turn (a count
    #: that shifts between pages while the list itself does not).
    count_shifts: tuple[int, ...] = ()
    _pages_served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- fleet ------------------------------------------------------------------------
    def add_robot(self, sn: str, shop_id: str, **state: Any) -> dict[str, Any]:
        robot = {"sn": sn, "shop_id": shop_id, "mac": "B0:0C:9D:59:16:E8", "battery": 85,
                 "isCharging": -1, "chargeType": 2, "runState": "IDLE", "moveState": "IDLE",
                 "chargeStage": "IDLE", "remainTime": 0, "productCode": "CC1",
                 "timestamp": str(int(time.time() * 1000)), "mapName": "floor-1",
                 "position": {"x": 1.5, "y": 2.5, "yaw": 0.5}}
        robot.update(state)
        self.robots[sn] = robot
        return robot

    def fail(self, path: str, kind: str, times: int = 1) -> None:
        with self.lock:
            self.faults.append(Fault(path, kind, times))

    def calls_to(self, path: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.path.endswith(path)]

    def _fault(self, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.path in path and fault.times > 0:
                    fault.times -= 1
                    return fault.kind
        return None

    # -- checking ----------------------------------------------------------------------
    def check(self, method: str, raw_path: str, query: str, headers: dict[str, str],
              body: bytes) -> str | None:
        """Why the request is refused (401), or None."""
        date = headers.get("x-date", "")
        if not date:
            return "missing x-date header"
        try:
            sent = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return "malformed x-date header"
        if abs(time.time() - sent) > MAX_SKEW:
            return "the x-date header is out of date"
        if headers.get("accept") != "application/json" or \
                headers.get("content-type") != "application/json":
            return "Accept and Content-Type must be application/json"
        md5 = headers.get("content-md5")
        if md5 is None:
            return "missing Content-MD5 header"
        want = "" if method == "GET" else base64.b64encode(
            hashlib.md5(body).hexdigest().encode()).decode()
        if method == "GET" and body:
            return "GET with a body"
        if md5 != want:
            return "Content-MD5 does not match the body"
        auth = headers.get("authorization", "")
        fields = dict(
            (k.strip().lower(), v.strip().strip('"'))
            for k, _, v in (p.partition("=") for p in auth.removeprefix("hmac ").split(","))
        )
        if not auth.startswith("hmac ") or fields.get("id") != self.key or \
                fields.get("algorithm") != "hmac-sha1" or fields.get("headers") != "x-date":
            return "invalid Authorization header"
        signed_path = raw_path + ("?" + unquote(query) if query else "")
        string = "\n".join((f"x-date: {date}", method, "application/json",
                            "application/json", md5, signed_path))
        expected = base64.b64encode(hmac.new(self.secret.encode(), string.encode(),
                                             hashlib.sha1).digest()).decode()
        if not hmac.compare_digest(expected, fields.get("signature", "")):
            return "HMAC signature does not match"
        return None

    # -- ASGI --------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        raw_path = scope.get("raw_path", scope["path"].encode()).decode()
        query = scope["query_string"].decode()
        method = scope["method"]
        params = dict(parse_qsl(query, keep_blank_values=True))
        path = scope["path"].removeprefix("/pudu-entry")
        parsed = json.loads(body) if body and method == "POST" else None
        call = Call(method, path, params, parsed)
        with self.lock:
            self.calls.append(call)
        status, reply = await self._answer(method, raw_path, query, headers, body, path,
                                           params, parsed)
        call.status = status
        payload = json.dumps(reply).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _answer(self, method: str, raw_path: str, query: str, headers: dict[str, str],
                      body: bytes, path: str, params: dict[str, str],
                      parsed: Any) -> tuple[int, Any]:
        refused = self.check(method, raw_path, query, headers, body)
        if refused is not None:
            with self.lock:
                self.unauthorized.append(refused)
            return 401, {"code": 401, "message": refused, "details": []}
        fault = self._fault(f"{path}?{query}")
        if fault == "429":
            return 429, {"code": 429, "message": "API rate limit exceeded"}
        if fault == "500":
            return 500, {"code": 500, "message": "internal error"}
        if fault == "stall":
            await asyncio.sleep(self.stall_seconds)
        if fault == "business":
            return 200, {"message": "CLOUD_OPEN_ROBOT_OFFLINE", "trace_id": f"{self.key}_b"}
        data = self._data(method, path, params, parsed)
        if isinstance(data, tuple):
            return data
        return 200, {"message": self.success, "trace_id": f"{self.key}_1", "data": data}

    def _robot(self, sn: str | None) -> dict[str, Any] | tuple[int, Any]:
        robot = self.robots.get(sn or "")
        if robot is None:
            return 200, {"message": "ROBOT_NOT_FOUND", "trace_id": f"{self.key}_n"}
        return robot

    def _data(self, method: str, path: str, params: dict[str, str], body: Any) -> Any:
        if path == "/data-open-platform-service/v1/api/robot":
            shop = params.get("shop_id")
            fleet = [r for r in self.robots.values() if shop is None or r["shop_id"] == shop]
            offset, limit = self._window(params)
            page = [{"sn": r["sn"], "mac": r["mac"], "shop_id": int(r["shop_id"]),
                     "shop_name": f"shop {r['shop_id']}"} for r in fleet[offset:offset + limit]]
            return {"count": self._n(self._shifted(len(fleet))), "list": page}
        if path == "/open-platform-service/v2/status/get_by_sn":
            r = self._robot(params.get("sn"))
            if isinstance(r, tuple):
                return r
            keys = ("sn", "mac", "timestamp", "battery", "isCharging", "chargeType",
                    "moveState", "chargeStage", "remainTime", "productCode", "runState")
            out = {k: r[k] for k in keys}
            if self.snake:
                out = {"".join("_" + c.lower() if c.isupper() else c for c in k): v
                       for k, v in out.items()}
            return out
        if path == "/open-platform-service/v1/status/get_by_sn":
            r = self._robot(params.get("sn"))
            if isinstance(r, tuple):
                return r
            return {"deviceName": r["sn"], "timestamp": r["timestamp"], "battery": r["battery"],
                    "isOnline": r["runState"] != "OFFLINE", "isCharging": r["isCharging"],
                    "mapName": r["mapName"], "position": r["position"],
                    "moveState": r["moveState"], "chargeStage": r["chargeStage"],
                    "remainTime": r["remainTime"]}
        if path == "/data-board/v1/log/error/query_list":
            start, end = int(params["start_time"]), int(params["end_time"])
            if params.get("timezone_offset") != "0" or int(params.get("limit", 10)) > 20:
                return 200, {"message": "PARAM_ERROR"}
            shop = params.get("shop_id")
            rows = [e for e in self.errors if e["shop_id"] == shop and
                    start <= e["_at"] <= end]
            offset, limit = self._window(params)
            page = [{k: v for k, v in e.items() if not k.startswith("_")}
                    for e in rows[offset:offset + limit]]
            return {"total": self._n(self._shifted(len(rows))), "offset": offset,
                    "limit": limit, "list": page}
        if path == "/open-platform-service/v2/recharge":
            r = self._robot(params.get("sn"))
            return r if isinstance(r, tuple) else {"desc": "ok", "taskId": "t-recharge"}
        if path == "/map-service/v1/open/map":
            code = self.maps.get((params.get("shopId", ""), params.get("mapName", "")))
            if code is None:
                return 200, {"message": "MAP_NOT_FOUND"}
            return {"mapName": params["mapName"], "url": "", "mapCode": code}
        if path == "/open-platform-service/v1/switch_map":
            r = self._robot(body.get("sn"))
            return r if isinstance(r, tuple) else {"taskId": "t-map", "code": 0,
                                                   "message": "SUCCESS"}
        if path == "/open-platform-service/v1/position_command":
            r = self._robot(body.get("sn"))
            return r if isinstance(r, tuple) else None
        return 404, {"code": 404, "message": f"no route {path}"}

    def _window(self, params: dict[str, str]) -> tuple[int, int]:
        """(offset, how many to answer): the asked limit, capped by ``page_cap``."""
        offset, limit = int(params.get("offset", 0)), int(params.get("limit", 10))
        return offset, limit if self.page_cap is None else min(limit, self.page_cap)

    def _shifted(self, count: int) -> int:
        with self.lock:
            served, self._pages_served = self._pages_served, self._pages_served + 1
        if not self.count_shifts:
            return count
        return max(0, count + self.count_shifts[served % len(self.count_shifts)])

    def _n(self, count: int) -> int | str:
        return str(count) if self.counts_as_text else count

    def add_error(self, sn: str, shop_id: str, at: float, error_id: str | None,
                  level: str = "Warning", kind: str = "LostLocalization") -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
        row = {"id": f"log-{len(self.errors)}", "sn": sn, "upload_time": stamp,
               "task_time": stamp, "error_level": level, "error_type": kind,
               "error_detail": "OdomSlip", "error_id": error_id or "", "shop_id": shop_id,
               "_at": int(at)}
        self.errors.append(row)
        return row


class StubServer:
    """uvicorn serving a ``PuduStub`` on its own thread and loop; stopped on exit."""

    def __init__(self, stub: PuduStub) -> None:
        self.stub = stub
        self.port = free_port()
        config = uvicorn.Config(stub, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", access_log=False, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="pudu-stub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StubServer:
        self.thread.start()
        def started() -> bool:
            if not self.thread.is_alive() and not self.server.started:
                raise RuntimeError("Pudu stub did not start")
            return bool(self.server.started)

        eventually(started, within=10, what="Pudu stub started")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_stub() -> Iterator[StubServer]:
    with StubServer(PuduStub()) as server:
        yield server
