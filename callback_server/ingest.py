"""``POST /callback/messages``: what an AWS IoT Rule's HTTP action pushes, settled truthfully.

The body is one envelope or a JSON array of them (the rule's batched HTTP action: up to
10 messages, at most 128 KiB; with ``batchAcrossTopics`` each element carries its own
``topic``). Each element ends in exactly one outcome (``callback_server.batcher.Outcome``)
and the answer says which, element by element; a bad element never fails the others:

- 200 once every element is settled (stored, duplicate, handled or dead-lettered);
- 403 only when the key covers none of the elements' orgs (each kept as a dead letter);
- 400/413 only when the body as a whole is unreadable (kept as one dead letter);
- 503 + ``Retry-After`` only when the database cannot commit in time, or HTTP ingest
  already holds ``INGEST_PENDING_MAX`` messages: the whole request is safe to retry,
  and a retry joins what is still pending instead of queueing it twice.

One request needs no key: AWS IoT's confirmation of the rule's HTTP destination, which
it POSTs to the confirmation URL (this route) without the rule's headers. It is
answered 200, its token logged once with how to confirm it and shown in the
authorised health body; the service never calls its ``enableUrl`` (the operator
confirms, so the service makes no outbound call and a forged request enables nothing).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
from fastapi import APIRouter, FastAPI, Header, Request, Response

from bridge import frames, strictjson
from bridge.envelope import Envelope
from bridge.errors import (
    FleetError,
    InputError,
    MalformedBodyError,
    PayloadError,
    PayloadTooLargeError,
    StoreError,
)
from bridge.http.body import read_body
from bridge.topic import (
    BATCH_CHANNEL,
    DeviceAddress,
    channel_for,
    parse_device_topic,
    scheme_of,
)
from callback_server.access import (
    Access,
    Ingester,
    Principal,
    Rules,
    access_of,
    header,
    ingester_of,
)
from callback_server.batcher import Outcome, Reason, Settled
from callback_server.consumer import consistent, frame_element, handled_by_gateway
from callback_server.ports import AppHost, Host, app_host

__all__ = ["INGEST_TIMEOUT_SECONDS", "DestinationConfirmations", "confirmations_of",
           "ingest_now", "router"]

log = logging.getLogger(__name__)

# An AWS IoT Rule HTTP action gives up after 3 s and retries; answer before that.
INGEST_TIMEOUT_SECONDS = 2.5
#: The dead letter's topic when neither the element nor the header names one.
NO_TOPIC = "http"


@dataclass(slots=True)
class _Element:
    """One element of the body: what it is, and (once known) why it is dead."""

    id: str | None
    topic: str | None
    org: str | None
    raw: Any  # the element as sent (dead-lettered as such)
    envelope: Envelope | None = None
    gateway: DeviceAddress | None = None
    dead: str | None = None  # the reason text (Reason.because)

    def payload(self) -> bytes:
        return strictjson.dumps(self.raw)


def _element(obj: Any, notes: list[str], header_topic: str | None,
             prefix: str) -> _Element:
    """Read one element; a fault marks it dead with the reason, never raises."""
    if not isinstance(obj, dict):
        return _Element(None, header_topic, None, obj,
                        dead=Reason.MALFORMED.because("each message must be a JSON object"))
    fields = dict(obj)
    given = fields.pop("topic", None)
    topic = header_topic if given in (None, "") else given
    ident = fields.get("id") if isinstance(fields.get("id"), str) else None
    org = fields.get("org") if isinstance(fields.get("org"), str) else None
    element = _Element(ident, topic if isinstance(topic, str) else None, org, obj)
    try:
        if topic is not None and not isinstance(topic, str):
            raise InputError("topic must be a string", field="topic")
        address = None
        if topic is not None:
            address = parse_device_topic(topic, prefix)
            element.org = address.org_id
            if handled_by_gateway(address.channel):
                element.gateway = address
                return element
        envelope = Envelope.from_dict(fields, notes=notes)
        element.org = envelope.org if address is None else address.org_id
        if address is None:
            channel = envelope.channel or channel_for(envelope.type)
            element.topic = str(scheme_of(envelope.org, prefix).device(envelope.device,
                                                                           channel))
            address = parse_device_topic(element.topic, prefix)
            if handled_by_gateway(address.channel):
                # the envelope names a gateway channel: the same outcome as with its topic
                element.gateway = address
                return element
    except FleetError as exc:
        element.dead = Reason.MALFORMED.because(getattr(exc, "message", None) or str(exc))
        return element
    if not consistent(address, envelope):
        element.dead = Reason.INCONSISTENT.because(
            f"envelope org/device ({envelope.org}/{envelope.device}) differ from the "
            f"topic's ({address.org_id}/{address.device_id})")
        return element
    element.envelope = envelope
    return element


def _notes_of(notes: list[str], i: int) -> list[str]:
    """The parse notes about element ``i`` of a list body, as paths inside it
    (``[1].data.x: …`` -> ``data.x: …``); the "more were changed" note goes to each."""
    mine = f"[{i}]."
    return [note[len(mine):] if note.startswith(mine) else note for note in notes
            if note.startswith(mine) or not note.startswith("[")]


def _frame(obj: Any, header_topic: str | None, prefix: str) -> list[_Element] | None:
    """The elements of a batch frame (``bridge/frames.py``), each settled on its own;
    None when ``obj`` is not a frame (by its topic, else by its shape)."""
    if not isinstance(obj, dict):
        return None
    fields = dict(obj)
    given = fields.pop("topic", None)
    topic = header_topic if given in (None, "") else given
    address = None
    if isinstance(topic, str):
        try:
            address = parse_device_topic(topic, prefix)
        except FleetError:
            address = None
    if address is None or address.channel != BATCH_CHANNEL:
        if not frames.is_frame(fields) or address is not None:
            return None
        return [_Element(None, topic if isinstance(topic, str) else None, None, obj,
                         dead=Reason.MALFORMED.because(
                             "a batch frame needs its gateway's batch topic"))]
    assert isinstance(topic, str)
    try:
        objs = frames.elements(fields)
    except FleetError as exc:
        return [_Element(None, topic, address.org_id, obj,
                         dead=Reason.MALFORMED.because(f"batch frame: {exc}"))]
    out = []
    for item in objs:
        own, envelope, dead = frame_element(topic, address, item, prefix)
        ident = item.get("id") if isinstance(item, dict) else None
        org = item.get("org") if isinstance(item, dict) else None
        out.append(_Element(ident if isinstance(ident, str) else None, own,
                            org if isinstance(org, str) else address.org_id, item,
                            envelope=envelope, dead=dead))
    return out


def _elements(parsed: strictjson.Parsed, header_topic: str | None,
              prefix: str) -> list[_Element]:
    """The body's elements: one envelope, an array (an IoT Rule's batched HTTP action,
    same-topic under ``X-Mqtt-Topic`` or across topics with each element's ``topic``),
    and a batch frame anywhere an envelope may be, expanded into its envelopes."""
    body = parsed.value
    items = list(enumerate(body)) if isinstance(body, list) else [(None, body)]
    out: list[_Element] = []
    for i, obj in items:
        expanded = _frame(obj, header_topic, prefix)
        if expanded is not None:
            out.extend(expanded)
            continue
        notes = parsed.notes if i is None else _notes_of(parsed.notes, i)
        out.append(_element(obj, notes, header_topic, prefix))
    return out


async def _keep(server: AppHost, dead: list[tuple[str, bytes, str]]) -> list[Settled]:
    """Dead letters committed before the answer goes out (503 if not in time)."""
    try:
        _, settled = await asyncio.wait_for(server.writer.settle((), dead),
                                            INGEST_TIMEOUT_SECONDS)
    except TimeoutError:
        raise StoreError("dead letter not committed in time") from None
    return settled


def _answer(elements: list[_Element], outcomes: list[Settled]) -> dict[str, Any]:
    counts = dict.fromkeys(Outcome, 0)
    results = []
    for element, settled in zip(elements, outcomes, strict=True):
        counts[settled.outcome] += 1
        result: dict[str, Any] = {"id": element.id, "outcome": settled.outcome.value}
        if settled.reason is not None:
            result["reason"] = settled.reason
        results.append(result)
    return {"status": "success", "stored": counts[Outcome.STORED],
            "duplicates": counts[Outcome.DUPLICATE], "handled": counts[Outcome.HANDLED],
            "dead_lettered": counts[Outcome.DEAD_LETTERED], "results": results,
            "timestamp": int(time.time())}


_ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["id", "type", "org", "device", "ts", "data"],
    "properties": {"v": {"type": "integer"}, "id": {"type": "string"},
                   "type": {"type": "string"}, "org": {"type": "string"},
                   "device": {"type": "string"}, "gateway": {"type": "string"},
                   "ts": {"type": "number"}, "data": {"type": "object"},
                   "raw": {"type": "object"}},
    "additionalProperties": True}
#: The body an IoT Rule posts: one envelope (bridge.envelope) or an array of them.
_ENVELOPES: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"anyOf": [
        _ENVELOPE_SCHEMA, {"type": "array", "items": _ENVELOPE_SCHEMA}]}}}}}


def _encoded(answer: dict[str, Any]) -> Response:
    """The answer encoded once, by orjson, bypassing FastAPI's ``jsonable_encoder`` and
    response-model pass: those take ~40 µs for a one-element answer on the bench machine
    (~125 µs for ten, more under load), against ~1 µs here, on the IoT Rule's hot path.
    The answer holds only strings and integers, so both encodings give the same JSON."""
    try:
        body = orjson.dumps(answer)
    except orjson.JSONEncodeError:  # a lone surrogate in an id: valid JSON, not UTF-8
        body = strictjson.dumps(answer)
    return Response(body, media_type="application/json")


# -- AWS IoT's HTTP destination confirmation -------------------------------------------
#: The header AWS IoT's rules engine sets on the confirmation request (and its value).
CONFIRMATION_HEADER = b"x-amz-rules-engine-message-type"
CONFIRMATION = "DestinationConfirmation"
#: A confirmation body is a few hundred bytes; more is read only after the key check.
_CONFIRMATION_MAX_BYTES = 16 * 1024
#: Confirmations held for health (the newest); a forged flood cannot grow it.
_CONFIRMATIONS_KEPT = 4
#: At most one confirmation logged in this many seconds (the rest wait in health).
_LOG_EVERY_SECONDS = 60.0
_ARN = re.compile(r"arn:aws[a-z-]*:iot:(?P<region>[a-z0-9-]{1,32}):\d{12}:"
                  r"ruledestination/http/[A-Za-z0-9-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9_.~+/=-]{1,2048}")
_ENABLE_URL = re.compile(r"https://iot\.(?P<region>[a-z0-9-]{1,32})\.amazonaws\.com(?:\.cn)?"
                         r"/confirmdestination/(?P<token>[^?#]+)")


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What AWS IoT sent to confirm an HTTP rule destination pointing here."""

    arn: str
    token: str
    enable_url: str
    received_at: int

    def body(self) -> dict[str, Any]:
        return {"arn": self.arn, "confirmation_token": self.token,
                "enable_url": self.enable_url, "received_at": self.received_at,
                "confirm_with": f"aws iot confirm-topic-rule-destination "
                                f"--confirmation-token {self.token}"}


class DestinationConfirmations:
    """The confirmations this replica received and the operator has yet to act on
    (in memory: AWS sends one to whichever replica the load balancer picks)."""

    def __init__(self) -> None:
        self._held: dict[str, Confirmation] = {}  # by destination ARN, oldest first
        self._logged_at = -math.inf
        #: New tokens not logged: one log line a minute at most (a forged flood).
        self.unlogged = 0

    def note(self, confirmation: Confirmation, now: float) -> bool:
        """Keep ``confirmation``; True when its token is new and none was logged in the
        last minute (so a real one is logged once, and a forged flood is no log flood)."""
        held = self._held.pop(confirmation.arn, None)
        self._held[confirmation.arn] = confirmation
        while len(self._held) > _CONFIRMATIONS_KEPT:
            del self._held[next(iter(self._held))]
        if held is not None and held.token == confirmation.token:
            return False
        if now - self._logged_at < _LOG_EVERY_SECONDS:
            self.unlogged += 1
            return False
        self._logged_at = now
        return True

    def pending(self) -> list[dict[str, Any]]:
        """For the authorised health body, newest first."""
        return [c.body() for c in reversed(self._held.values())]


def confirmations_of(app: FastAPI) -> DestinationConfirmations:
    """The app's confirmations (``app.state``), made on first use."""
    held = getattr(app.state, "destination_confirmations", None)
    if not isinstance(held, DestinationConfirmations):
        held = app.state.destination_confirmations = DestinationConfirmations()
    return held


def _confirmation(request: Request, raw: bytes) -> Confirmation | None:
    """``raw`` as AWS IoT's destination confirmation, or None when it is not exactly one:
    the ARN, the token and an ``enableUrl`` on AWS IoT's own host for that token and
    region (never an address a forger chose)."""
    try:
        body = strictjson.loads(raw).value
    except PayloadError:
        return None
    if not isinstance(body, dict) or body.get("messageType") != CONFIRMATION:
        return None
    arn, token, url = body.get("arn"), body.get("confirmationToken"), body.get("enableUrl")
    if not (isinstance(arn, str) and isinstance(token, str) and isinstance(url, str)):
        return None
    arn_match, url_match = _ARN.fullmatch(arn), _ENABLE_URL.fullmatch(url)
    if arn_match is None or url_match is None or _TOKEN.fullmatch(token) is None:
        return None
    if (url_match["region"] != arn_match["region"]
            or unquote(url_match["token"]) != token):
        return None
    given = request.query_params.get("confirmationToken")
    named = header(request, b"x-amz-rules-engine-destination-arn").strip().strip('"')
    if (given is not None and given != token) or (named and named != arn):
        return None
    return Confirmation(arn, token, url, int(time.time()))


async def _confirm(request: Request) -> tuple[bytes | None, Response | None]:
    """A request whose header says it is AWS IoT's destination confirmation, read before
    any key is asked for: (its body, the 200) when it is one, else (the body read, None)
    and the caller goes on as for any request (401 without a key)."""
    declared = request.headers.get("content-length", "")
    if not (declared.isdigit() and int(declared) <= _CONFIRMATION_MAX_BYTES):
        return None, None  # not read: the usual path reads it after the key check
    raw = await read_body(request, _CONFIRMATION_MAX_BYTES)
    confirmation = _confirmation(request, raw)
    if confirmation is None:
        return raw, None
    if confirmations_of(request.app).note(confirmation, time.monotonic()):
        log.warning(
            "AWS IoT asks to confirm the HTTP rule destination %s pointing here; this "
            "service never confirms it itself. Run `aws iot confirm-topic-rule-destination "
            "--confirmation-token %s` (or open %s), then `aws iot "
            "update-topic-rule-destination --arn %s --status ENABLED`. The token is also "
            "in GET /callback/health with a key.", confirmation.arn, confirmation.token,
            confirmation.enable_url, confirmation.arn)
    return raw, _encoded({"status": "success", "message": "destination confirmation "
                          "received; the operator confirms it (see the service's log)",
                          "timestamp": int(time.time())})


router = APIRouter()


@router.post("/callback/messages", openapi_extra=_ENVELOPES,
             summary="Ingest envelopes pushed by an AWS IoT Rule (one, or an array)",
             responses={
                 200: {"description": "Every element settled: the counts, and each "
                                      "element's outcome in the body's order"},
                 400: {"description": "Body unreadable as a whole (kept as a dead letter)"},
                 403: {"description": "The key covers none of the elements' orgs"},
                 413: {"description": "Body over max_body_bytes (kept as a dead letter)"},
                 503: {"description": "Not committed in time, or too much pending; "
                                      "retry after Retry-After (idempotent)"}})
async def ingest(request: Request, principal: Ingester, server: Host, access: Rules,
                 x_mqtt_topic: str | None = Header(default=None)) -> Response:
    # Reached only if the app's shortcut (``ingest_now``) is bypassed; here for the docs.
    return await _ingest(request, principal, server, access, x_mqtt_topic)


@router.post("/callback/messages/", include_in_schema=False)
async def ingest_slash(request: Request) -> Response:
    """The same route with a trailing slash: AWS IoT's documented confirmation request
    is ``POST {confirmationUrl}/?confirmationToken=...``, and a redirect is not followed."""
    return await ingest_now(request)


async def ingest_now(request: Request) -> Response:
    """The route without FastAPI's dependency solving (``bridge.http.shortcut``): the same
    checks, called in the same order (AWS IoT's destination confirmation first: it
    carries no key)."""
    raw = None
    if header(request, CONFIRMATION_HEADER) == CONFIRMATION:
        raw, confirmed = await _confirm(request)
        if confirmed is not None:
            return confirmed
    return await _ingest(request, await ingester_of(request), await app_host(request),
                         await access_of(request), header(request, b"x-mqtt-topic") or None,
                         raw)


async def _ingest(request: Request, principal: Principal, server: AppHost, access: Access,
                  x_mqtt_topic: str | None, raw: bytes | None = None) -> Response:
    """``raw``: the body when it was already read (a would-be confirmation)."""
    topic = x_mqtt_topic or NO_TOPIC
    try:
        limit = server.settings.max_body_bytes
        if raw is None:
            raw = await read_body(request, limit)
        elif len(raw) > limit:
            raise PayloadTooLargeError(len(raw), limit, "request body")
    except PayloadTooLargeError as exc:
        await _keep(server, [(topic, b"", Reason.UNREADABLE.because(str(exc)))])
        raise
    try:
        parsed = strictjson.loads(raw)
    except PayloadError as exc:
        await _keep(server, [(topic, raw, Reason.UNREADABLE.because(f"body is {exc}"))])
        raise MalformedBodyError(f"body is {exc}") from None
    elements = _elements(parsed, x_mqtt_topic, server.settings.topic_prefix)
    await _refuse_foreign(access, principal, elements, server)
    return _encoded(_answer(elements, await _settle(server, elements)))


async def _refuse_foreign(access: Access, principal: Principal, elements: list[_Element],
                          server: AppHost) -> None:
    """Mark the elements of orgs the key does not cover; when it covers none of the
    orgs named, the request is refused (403) after each element is kept with why."""
    orgs = {e.org for e in elements if e.org is not None}
    foreign = {org for org in orgs if not principal.covers(org)}
    for element in elements:
        if element.dead is None and element.org in foreign:
            element.dead = Reason.FOREIGN.because(
                f"key {principal.name!r} does not cover org {element.org!r}")
    if orgs and foreign == orgs:
        # Kept before the 403 goes out: the rule would otherwise retry it forever.
        await _keep(server, [(e.topic or NO_TOPIC, e.payload(), e.dead or "")
                             for e in elements])
        access.refuse_foreign(principal, orgs)


async def _settle(server: AppHost, elements: list[_Element]) -> list[Settled]:
    """Each element's outcome: gateway traffic handled here, envelopes stored and dead
    letters kept by the batch writer, all committed before this returns."""
    envelopes = [(e.topic or NO_TOPIC, e.envelope) for e in elements
                 if e.dead is None and e.envelope is not None]
    dead = [(e.topic or NO_TOPIC, e.payload(), e.dead) for e in elements if e.dead is not None]
    for element in elements:
        if element.dead is None and element.gateway is not None:
            server.consumer.on_gateway(element.gateway, strictjson.dumps(
                {k: v for k, v in element.raw.items() if k != "topic"}))
    try:
        stored, kept = await asyncio.wait_for(server.writer.settle(envelopes, dead),
                                              INGEST_TIMEOUT_SECONDS)
    except TimeoutError:
        # Still queued and written once the database answers; the retry joins them.
        raise StoreError("not committed in time") from None
    stored_it, kept_it = iter(stored), iter(kept)
    outcomes = []
    for element in elements:
        if element.dead is not None:
            outcomes.append(next(kept_it))
        elif element.envelope is not None:
            outcomes.append(next(stored_it))
        else:
            outcomes.append(Settled(Outcome.HANDLED))
    return outcomes
