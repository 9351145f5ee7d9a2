"""The signed async client of the Pudu Open API, and the endpoints the product uses.

Every call goes through ``bridge.http.outbound.client`` (the product's one rule for
outbound HTTP), with the configured API host allowed, so a loopback stub works in tests
and nothing else non-global is reachable. Success is HTTP 200 with ``message``
``SUCCESS`` (case-insensitive; ``ok`` is seen live, docs/pudu.md); anything else is a
``PuduApiError`` of the right kind. 5xx, timeouts, connection failures and rate limits
are retried with full-jitter back-off, at most ``max_retries`` times, for the reads; a
robot command (recharge, switch_map, position_command) is not idempotent, so it is
retried only when it provably did not run: a 429, or no connection made. httpx and
Pudu errors are translated here, once. The secret and signatures are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bridge import strictjson
from bridge.backoff import backoff_delay
from bridge.errors import (
    OutboundRefusedError,
    PayloadError,
    PuduApiError,
    PuduAuthError,
    PuduBusinessError,
    PuduConnectError,
    PuduRateLimitError,
    PuduServerError,
)
from bridge.http.outbound import OutboundPolicy
from bridge.http.outbound import client as outbound_client
from edge_agent.pudu import signing
from edge_agent.pudu.settings import ENTRY, PuduApiSettings

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

ROBOTS = "/data-open-platform-service/v1/api/robot"
STATUS_V2 = "/open-platform-service/v2/status/get_by_sn"
STATUS_V1 = "/open-platform-service/v1/status/get_by_sn"
ERROR_LOG = "/data-board/v1/log/error/query_list"
RECHARGE = "/open-platform-service/v2/recharge"
MAP_DETAIL = "/map-service/v1/open/map"
SWITCH_MAP = "/open-platform-service/v1/switch_map"
POSITION = "/open-platform-service/v1/position_command"

#: Robot list page size (the maximum is undocumented); logs allow at most 20.
ROBOT_PAGE = 50
LOG_PAGE = 20
#: A paging loop stops after this many pages whatever ``count`` says (it may shift).
MAX_PAGES = 500
_OK = ("success", "ok")


def pick(obj: Any, *names: str) -> Any:
    """The first present, non-null field of ``obj`` among spellings (camel or snake)."""
    if not isinstance(obj, dict):
        return None
    for name in names:
        value = obj.get(name)
        if value is not None:
            return value
    return None


def _count(value: Any) -> int | None:
    """A page's ``count``/``total``: an int, or an int sent as a string (both are seen)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def robot_unknown(exc: PuduApiError) -> bool:
    """Pudu's "no such robot for this key" refusal. The spelling is not documented
    (docs/pudu.md, "API 6"): ROBOT_NOT_FOUND and the NOT_EXIST/NOT_BIND variants."""
    if not isinstance(exc, PuduBusinessError):
        return False
    words = [w for w in re.split(r"[^A-Z]+", exc.message.upper()) if w]
    joined = "_".join(words)
    return bool({"ROBOT", "SN", "DEVICE"} & set(words)) and any(
        why in joined for why in ("NOT_FOUND", "NOT_EXIST", "NOT_BIND", "NO_EXIST"))


def _message(obj: Any) -> str:
    value = pick(obj, "message", "msg")
    return str(value)[:300] if value is not None else ""


class PuduClient:
    """One API key's client; an async context manager owning its connection pool.

    ``calls`` and ``retries`` count every attempt, for the poller's run records.
    """

    def __init__(self, settings: PuduApiSettings, policy: OutboundPolicy | None = None,
                 *, clock: Callable[[], float] = time.time) -> None:
        if not settings.configured:
            raise PuduAuthError("no API key configured (PUDU_API_URL, PUDU_API_KEY, "
                                "PUDU_API_SECRET)", path="-")
        self.settings = settings
        assert settings.api_secret is not None
        self._key = settings.api_key
        self._secret = settings.api_secret.get_secret_value()
        base = policy or OutboundPolicy()
        # The operator named this host: allow it even when it is loopback (a test stub).
        self.policy = OutboundPolicy(allow=(*base.allow, settings.host), resolver=base.resolver)
        self.clock = clock
        self.calls = 0
        self.retries = 0
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> PuduClient:
        self._http = outbound_client(self.policy, timeout=self.settings.timeout_seconds)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    # -- transport ------------------------------------------------------------------------
    async def get(self, path: str, params: dict[str, Any] | None = None, *,
                  idempotent: bool = True) -> Any:
        """GET ``path`` (below /pudu-entry) with query ``params``; the reply's ``data``."""
        return await self._call("GET", path, params or {}, None, idempotent)

    async def post(self, path: str, body: dict[str, Any], *, idempotent: bool = True) -> Any:
        """POST a JSON body; the reply's ``data``."""
        return await self._call("POST", path, {}, body, idempotent)

    async def _call(self, method: str, path: str, params: dict[str, Any],
                    body: dict[str, Any] | None, idempotent: bool) -> Any:
        s = self.settings
        attempt = 0
        while True:
            try:
                return await self._once(method, path, params, body)
            except (PuduRateLimitError, PuduServerError) as exc:
                # A 5xx or a timeout may come after the API acted: repeating a command
                # could move the robot twice. A 429 or no connection means it did not act.
                safe = idempotent or isinstance(exc, PuduRateLimitError | PuduConnectError)
                if not safe:
                    raise PuduServerError(
                        f"{exc.message}; a robot command is not repeated (it may have "
                        "reached the robot)", path=path, status=exc.status,
                        trace_id=exc.trace_id, retries=attempt) from exc
                if attempt >= s.max_retries:
                    exc.retries = attempt
                    raise
                delay = backoff_delay(attempt, 0.25, s.retry_max_seconds)
                if isinstance(exc, PuduRateLimitError) and exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, s.retry_max_seconds))
                attempt += 1
                self.retries += 1
                log.warning("Pudu API %s %s: %s; retry %d of %d in %.1f s", method, path,
                            exc.message, attempt, s.max_retries, delay)
                await asyncio.sleep(delay)

    async def _once(self, method: str, path: str, params: dict[str, Any],
                    body: dict[str, Any] | None) -> Any:
        import httpx

        assert self._http is not None, "enter the client first (async with)"
        self.calls += 1
        full = ENTRY + path
        query = signing.encode_query(params) if method == "GET" else ""
        content = signing.body_bytes(body) if body is not None else None
        headers = signing.signed_headers(key=self._key, secret=self._secret, method=method,
                                         path=full, query=query, body=content,
                                         now=self.clock())
        url = self.settings.api_url + full + (f"?{query}" if query else "")
        try:
            reply = await self._http.request(method, url, content=content, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Raised before a byte of the request was written: it never reached the API.
            raise PuduConnectError(f"no connection: {type(exc).__name__}",
                                   path=path) from None
        except httpx.TimeoutException:
            raise PuduServerError(f"no answer within {self.settings.timeout_seconds:g} s",
                                  path=path) from None
        except OutboundRefusedError as exc:
            raise PuduApiError(f"refused by the outbound rule: {exc.message}",
                               path=path) from None
        except httpx.HTTPError as exc:
            raise PuduServerError(f"connection failed: {type(exc).__name__}",
                                  path=path) from None
        return self._read(path, reply)

    def _read(self, path: str, reply: httpx.Response) -> Any:
        status = reply.status_code
        try:
            obj: Any = strictjson.loads(reply.content).value if reply.content else None
        except PayloadError:
            obj = None
        message = _message(obj)
        trace = pick(obj, "trace_id", "traceId")
        trace_id = None if trace is None else str(trace)[:128]
        args: dict[str, Any] = {"path": path, "status": status, "trace_id": trace_id}
        if status == 429 or "rate limit" in message.lower():
            after = reply.headers.get("retry-after", "")
            raise PuduRateLimitError(message or "rate limited (HTTP 429)",
                                     retry_after=float(after) if after.isdigit() else None,
                                     **args)
        if status in (401, 403):
            raise PuduAuthError(message or f"HTTP {status}", **args)
        if status >= 500:
            raise PuduServerError(message or f"HTTP {status}", **args)
        if status != 200 or not isinstance(obj, dict):
            raise PuduApiError(message or f"HTTP {status}, body not a JSON object", **args)
        if message.lower() not in _OK:
            raise PuduBusinessError(message or "no message in the reply", **args)
        log.debug("Pudu API %s ok (trace %s)", path, trace_id)
        return obj.get("data")

    # -- endpoints ------------------------------------------------------------------------
    async def robots(self, shop_id: str | None) -> list[dict[str, Any]]:
        """Every robot of a shop (None: of the key), through every page."""
        params: dict[str, Any] = {} if shop_id is None else {"shop_id": shop_id}
        rows = await self.pages(ROBOTS, params, ROBOT_PAGE)
        return [r for r in rows if pick(r, "sn")]

    async def pages(self, path: str, params: dict[str, Any], limit: int,
                    ) -> list[dict[str, Any]]:
        """Every item of a paged list (``limit``/``offset``, ``data.list``, ``count`` or
        ``total``), read page after page.

        The offset advances by what came back, never by what was asked: a server with
        an undocumented maximum page (the log endpoints cap at 20) answers fewer items
        than ``limit``, and adding ``limit`` would skip the rest silently.

        The count can shift between pages (robots added or removed while paging, or a
        server that under- or over-reports it), so it ends the read only where it agrees
        with what came back: on an empty page, or on a page that brings the offset
        exactly to the count it reported. Anything else asks for the next page (at most
        one call more than needed); ``MAX_PAGES`` bounds it all."""
        out: list[dict[str, Any]] = []
        offset = 0
        for _ in range(MAX_PAGES):
            data = await self.get(path, {**params, "limit": limit, "offset": offset})
            items = pick(data, "list") or []
            if not isinstance(items, list) or not items:
                break
            out += [item for item in items if isinstance(item, dict)]
            offset += len(items)
            if _count(pick(data, "count", "total")) == offset:
                break
        else:
            log.warning("Pudu API %s: stopped after %d pages (%d items)", path, MAX_PAGES,
                        len(out))
        return out

    async def status(self, sn: str) -> dict[str, Any]:
        """v2 state: battery, charging, run and move state."""
        data = await self.get(STATUS_V2, {"sn": sn})
        return data if isinstance(data, dict) else {}

    async def status_v1(self, sn: str) -> dict[str, Any]:
        """v1 state: adds the map name and the pose."""
        data = await self.get(STATUS_V1, {"sn": sn})
        return data if isinstance(data, dict) else {}

    async def error_log(self, shop_id: str, start: int, end: int) -> list[dict[str, Any]]:
        """The fault/event log of a shop for [start, end] (epoch s, UTC), every page."""
        return await self.pages(ERROR_LOG, {
            "shop_id": shop_id, "start_time": start, "end_time": end,
            "timezone_offset": 0}, LOG_PAGE)

    async def recharge(self, sn: str) -> Any:
        return await self.get(RECHARGE, {"sn": sn}, idempotent=False)

    async def map_code(self, shop_id: str, map_name: str) -> str:
        """A map's ``mapCode`` from the map detail (switch_map needs it)."""
        data = await self.get(MAP_DETAIL, {"shopId": shop_id, "mapName": map_name})
        code = pick(data, "mapCode", "map_code")
        if code in (None, ""):
            raise PuduBusinessError(f"map {map_name!r} has no mapCode in shop {shop_id}",
                                    path=MAP_DETAIL)
        return str(code)

    async def switch_map(self, sn: str, map_name: str, map_code: str) -> Any:
        data = await self.post(SWITCH_MAP, {"sn": sn, "mapInfo": {"mapName": map_name,
                                                                  "mapCode": map_code}},
                               idempotent=False)
        _check_inner(SWITCH_MAP, data)
        return data

    async def position_reporting(self, sn: str, interval: int, times: int) -> Any:
        return await self.post(POSITION, {"sn": sn, "payload": {"interval": interval,
                                                                "times": times}},
                               idempotent=False)


def _check_inner(path: str, data: Any) -> None:
    """Some ``data`` objects carry their own code/message (docs/pudu.md, "API 3")."""
    if not isinstance(data, dict) or "code" not in data:
        return
    code, message = data.get("code"), _message(data)
    if str(code) in ("0", "200") or message.lower() in _OK:
        return
    raise PuduBusinessError(message or f"inner code {code}", path=path)
