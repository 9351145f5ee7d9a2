"""Pudu's webhooks straight into the callback server: deployments without a gateway.

The replaced cloud receiver took Pudu's callbacks itself; so can this server, on the
same two URLs Pudu registers (``POST /api/pudu/webhook``, ``GET
/api/pudu/webhook/health``), with the same ``CallbackCode`` header and the same answers
as the edge agent's. Each callback code names its org (``CALLBACK_CODES``); the callback
is normalised by the one normaliser the edge uses (``bridge.pudu``), so its rows are
those the edge path would write, under the gateway id ``CLOUD_GATEWAY_ID``.

200 only after the database commit (Pudu drops a callback after 3 retries, so nothing
is answered 200 that is not stored); 503 + ``Retry-After`` when the database cannot
commit within ``WEBHOOK_TIMEOUT_SECONDS`` (Pudu retries; the retry joins the pending
message). A callback the database refuses is kept as a dead letter and answered 422.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

import yaml
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from bridge import strictjson
from bridge.envelope import Envelope
from bridge.errors import (
    AuthError,
    BodyTooLargeError,
    ConfigError,
    InputError,
    MalformedBodyError,
    PayloadError,
    PayloadTooLargeError,
    StoreError,
    TopicError,
)
from bridge.http.body import read_body
from bridge.http.error_boundary import status_for
from bridge.pudu import normalize
from bridge.pudu.answer import CALLBACK_REQUEST, accepted
from bridge.service.health import (
    HEALTH_RESPONSES,
    HealthQuery,
    health_status,
    unready_body,
)
from bridge.service.settings_loader import split_list
from bridge.topic import TopicScheme, scheme_of
from callback_server.batcher import Outcome
from callback_server.ports import AppHost, Host
from callback_server.settings import CallbackSettings

__all__ = ["CLOUD_GATEWAY_ID", "WEBHOOK_PATH", "CallbackCodes", "install", "router"]

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/api/pudu/webhook"
#: The ``gateway`` of envelopes from Pudu webhooks taken here (no gateway relayed them);
#: also the device of shop-level callbacks (no ``sn``), as the gateway's id is on the edge.
CLOUD_GATEWAY_ID = "cloud"
#: Pudu gives up on an answer after 5 s (and retries): answer before that.
WEBHOOK_TIMEOUT_SECONDS = 4.0


@dataclass(frozen=True, slots=True)
class CallbackCodes:
    """Pudu callback codes and the org each one is for; never logged or shown."""

    codes: tuple[tuple[bytes, str], ...] = ()

    def __len__(self) -> int:
        return len(self.codes)

    def org_of(self, given: bytes) -> str | None:
        """The org of ``given``, compared in constant time with every code (no early exit,
        so the answer's timing does not tell which code, or how much of one, matched)."""
        found = None
        for code, org in self.codes:
            if hmac.compare_digest(given, code):
                found = org
        return found

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], where: str) -> CallbackCodes:
        codes: dict[str, str] = {}
        for code, org in pairs:
            code, org = code.strip(), org.strip()
            if not code or not org:
                raise ConfigError(f"{where}: each entry needs a code and an org (code=org)")
            try:
                TopicScheme(org)
            except TopicError as exc:
                raise ConfigError(f"{where}: org {org!r} cannot be a topic level: "
                                  f"{exc.reason}") from None
            if codes.get(code, org) != org:
                raise ConfigError(f"{where}: one callback code is given for two orgs "
                                  f"({codes[code]!r} and {org!r})")
            codes[code] = org
        return cls(tuple((code.encode(), org) for code, org in codes.items()))

    @classmethod
    def load(cls, settings: CallbackSettings) -> CallbackCodes:
        """``CALLBACK_CODES`` (``code1=orgA,code2=orgB``) and ``CALLBACK_CODES_FILE`` (a
        YAML mapping ``code: org``), together; ConfigError names the source, not a code."""
        pairs: list[tuple[str, str]] = []
        if settings.callback_codes is not None:
            for entry in split_list(settings.callback_codes.get_secret_value()):
                code, sep, org = entry.partition("=")
                if not sep:
                    raise ConfigError("CALLBACK_CODES: each entry is code=org (no space "
                                      "around '='), entries separated by commas")
                pairs.append((code, org))
        if settings.callback_codes_file:
            pairs += _read_file(settings.callback_codes_file)
        return cls.from_pairs(pairs, "CALLBACK_CODES")


def _read_file(path: str) -> list[tuple[str, str]]:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"CALLBACK_CODES_FILE: cannot read {path}: "
                          f"{type(exc).__name__}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not all(
            isinstance(k, str | int) and isinstance(v, str) for k, v in doc.items()):
        raise ConfigError(f"CALLBACK_CODES_FILE: {path} must map each code to an org name")
    return [(str(code), org) for code, org in doc.items()]


router = APIRouter()


def install(app: FastAPI, server: AppHost) -> None:
    """Load the callback codes (ConfigError at startup if invalid) into ``app.state``
    and mount the two routes Pudu calls."""
    app.state.pudu_codes = CallbackCodes.load(server.settings)
    app.include_router(router)


async def _codes(request: Request) -> CallbackCodes:
    return cast(CallbackCodes, request.app.state.pudu_codes)


Codes = Annotated[CallbackCodes, Depends(_codes)]


@router.post(WEBHOOK_PATH, openapi_extra=CALLBACK_REQUEST,
             summary="Receive a Pudu callback and answer 200 once it is in the database",
             responses={
                 400: {"description": "Body is not a JSON object"},
                 401: {"description": "Missing or wrong CallbackCode header"},
                 413: {"description": "Body larger than max_body_bytes"},
                 422: {"description": "A field is missing or has the wrong type, or the "
                                      "database refused it (kept as a dead letter)"},
                 503: {"description": "Database did not commit in time; retry after "
                                      "Retry-After"}})
async def pudu_webhook(request: Request, server: Host, codes: Codes) -> JSONResponse:
    counted = server.metrics.pudu_webhooks
    org = codes.org_of(request.headers.get("callbackcode", "").encode())
    if org is None:
        refused = AuthError("missing or invalid CallbackCode header")
        counted.labels(outcome=f"rejected_{status_for(refused)}").inc()
        raise refused
    try:
        answer = await _accept(server, request, org, server.settings.topic_prefix)
    except InputError as exc:
        counted.labels(outcome=f"rejected_{status_for(exc)}").inc()
        raise
    except StoreError:
        counted.labels(outcome="unavailable").inc()
        raise
    counted.labels(outcome="duplicate" if answer["data"]["duplicate"] else "accepted").inc()
    return JSONResponse(answer)


@router.get(WEBHOOK_PATH + "/health", summary="Database state, as Pudu's monitors poll it",
            description="200 with `status` healthy|degraded (the database: what taking "
            "Pudu's callbacks here needs) while serving. `?ready=1`: 503 until the server "
            "can take traffic (listeners bound, database reachable) and while it stops; a "
            "broker outage never fails it. `?strict=1`: also 503 while degraded (for "
            "`curl -f` monitors). The same three forms as `/callback/health` and the edge "
            "agent's health.",
            responses=HEALTH_RESPONSES)
async def pudu_health(request: Request, server: Host, codes: Codes) -> JSONResponse:
    query = HealthQuery(request.query_params)  # a bad flag is refused before any work
    if server.readiness.waiting_for("store"):  # not entered: nothing to ask yet
        body = unready_body("callback-server", server.readiness.reasons())
    else:
        # The server's own report decides readiness (one rule for both health paths);
        # this path's status is the database's alone, as Pudu's monitors read it.
        report = await server.health()
        db_ok = bool(report["database_ok"])
        body = {"status": "healthy" if db_ok else "degraded", "timestamp": int(time.time()),
                "service": "callback-server", "version": server.version,
                "ready": report["ready"], "not_ready": report["not_ready"],
                "database_ok": db_ok, "callback_codes": len(codes),
                "pending": server.writer.pending, "stored": server.writer.stored}
    return JSONResponse(body, status_code=health_status(body, query, body["not_ready"]))


async def _accept(server: AppHost, request: Request, org: str,
                  prefix: str) -> dict[str, Any]:
    """Normalise as the edge does, commit, and the answer (InputError / StoreError)."""
    limit = server.settings.max_body_bytes
    try:
        raw = await read_body(request, limit)
    except PayloadTooLargeError:
        raise BodyTooLargeError(f"body larger than {limit} bytes") from None  # as the edge
    try:
        parsed = strictjson.loads(raw)
    except PayloadError as exc:
        raise MalformedBodyError(f"body is {exc}") from None
    now = time.time()
    norm = normalize(parsed.value, received_at=now,
                      max_skew=server.settings.max_clock_skew_seconds)
    if norm.skewed:
        log.warning("robot %s: %s", norm.device_id, norm.skew_note)
    device = norm.device_id or CLOUD_GATEWAY_ID
    try:
        topic = str(scheme_of(org, prefix).device(device, norm.channel))
    except TopicError as exc:
        raise InputError(exc.reason, field="data.sn") from None
    envelope = Envelope(
        id=norm.message_id, type=norm.callback_type, org=org, device=device,
        gateway=CLOUD_GATEWAY_ID, ts=norm.ts, received_at=now, data=norm.data,
        raw=norm.raw, channel=norm.channel, notes=(*parsed.notes, *norm.notes))
    try:
        [settled] = await asyncio.wait_for(server.writer.write([(topic, envelope)]),
                                           WEBHOOK_TIMEOUT_SECONDS)
    except TimeoutError:
        raise StoreError("callback not committed in time") from None
    if settled.outcome is Outcome.DEAD_LETTERED:
        raise InputError(f"{settled.reason}; kept as a dead letter")
    duplicate = settled.outcome is Outcome.DUPLICATE
    return accepted(norm, now, topic, "duplicate callback already accepted" if duplicate
                   else "callback accepted", duplicate=duplicate)
