"""The public HTTP app: the Pudu webhook and its health check, nothing else.

The webhook endpoint reads the raw body itself instead of declaring a pydantic body
model: a callback must be accepted even when its shape is only roughly right (docs/pudu.md),
errors must name the field, and FastAPI's body-model path costs ~3x per request on the
hot path (docs/measured.md). The OpenAPI schema still describes it.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope

from bridge import strictjson
from bridge.envelope import Envelope
from bridge.errors import (
    AuthError,
    BodyTooLargeError,
    FleetError,
    InputError,
    MalformedBodyError,
    OutboxError,
    PayloadError,
    TopicError,
)
from bridge.http.error_boundary import error_response, internal_error_response, status_for
from bridge.http.error_boundary import install as install_error_handlers
from bridge.http.shortcut import Answer, ShortcutApp
from bridge.outbox import PutResult, body_key
from bridge.pudu.answer import CALLBACK_REQUEST, accepted
from bridge.pudu.normalize import DOCUMENTED_TYPES, Normalized, normalize
from bridge.service.health import (
    HEALTH_RESPONSES,
    HealthQuery,
    health_status,
    unready_body,
)
from edge_agent.downsample import Verdict
from edge_agent.ports import WebhookAgent, WebhookHost

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/api/pudu/webhook"
_TYPE_LABELS = frozenset(DOCUMENTED_TYPES)
_WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Committed to the outbox (the replaced receiver's shape, plus the "
                         "topic and message id)",
          "content": {"application/json": {"example": {
              "status": "success",
              "message": "Robot status processed: online; callback accepted",
              "timestamp": 1640995800,
              "data": {"robot_sn": "811064412050012", "status": "online",
                       "callback_type": "notifyRobotStatus", "message_id": "3f1c…",
                       "topic": "org/acme/device/811064412050012/status",
                       "duplicate": False}}}}},
    400: {"description": "Body is not a JSON object"},
    401: {"description": "Missing or wrong CallbackCode header"},
    413: {"description": "Body larger than MAX_BODY_BYTES"},
    422: {"description": "A field is missing or has the wrong type (the message names it)"},
    503: {"description": "Outbox full or unwritable; retry after the Retry-After seconds"},
}


def _headers(scope: Scope) -> tuple[bytes, bytes | None]:
    """CallbackCode and Content-Length in one pass over the raw header list."""
    code = declared = None
    for name, value in scope["headers"]:  # the first of a repeated header wins, as in Starlette
        if name == b"callbackcode":
            code = value if code is None else code
        elif name == b"content-length":
            declared = value if declared is None else declared
    return code or b"", declared


async def _read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes | None:
    """The whole body, at most ``limit`` bytes; None if the client went away."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLargeError(f"body larger than {limit} bytes")
        except ValueError:
            raise MalformedBodyError("invalid Content-Length header") from None
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect: nobody to answer
        chunk: bytes = message.get("body", b"")
        body += chunk
        if len(body) > limit:
            raise BodyTooLargeError(f"body larger than {limit} bytes")
        if not message.get("more_body", False):
            return body


def _undecided(norm: Normalized, now: float) -> str:
    """The note of a robot time too far ahead of the gateway's clock when no other robot
    tells which of the two is wrong: it blames neither (docs/clocks.md). It names
    ``received_at``, which orders the message, as the cloud reads a stand-in."""
    ahead = (norm.robot_ts or now) - now
    return (f"ts: robot time {norm.robot_ts!r} and the gateway clock disagree by "
            f"{ahead:.0f} s, and no other robot heard lately tells which one is wrong; "
            "ordered by received_at")


class _Webhook:
    """The webhook as a direct route (``answer``); ``accept`` is the part shared with the
    docs route.

    On the ingest bench (py-spy) FastAPI's middleware stack, the router, Starlette's
    Request and JSONResponse were ~13% of all samples around a ~16% handler; answering
    from here cut CPU per accept by roughly a fifth (with the PUBACK batching).
    """

    def __init__(self, agent: WebhookHost) -> None:
        settings = agent.settings
        self.agent = agent
        self.code = settings.pudu_callback_code.get_secret_value().encode()
        self.limit = settings.max_body_bytes
        self.org = settings.org_id
        self.gateway = settings.gateway_id
        self.metrics = agent.metrics
        # Resolving a label child takes a lock and a dict lookup: once per (outcome, type).
        self._counted: dict[tuple[str, str], Any] = {}
        self.skewed = agent.metrics.clock_skew
        self.max_skew = settings.max_clock_skew_seconds
        self.policy = agent.policy
        self.filtering = not agent.policy.everything
        self.downsampler = agent.downsampler
        self._downsampled: dict[str, Any] = {}
        self.clocks = agent.clocks                # the ordering rule (bridge/clock.py)
        self.gateway_clock = agent.gateway_clock  # this gateway's clock, checked
        self.clock = time.time                    # the gateway clock (tests set it)

    async def answer(self, scope: Scope, receive: Receive) -> Answer:
        """The whole answer to one callback (a direct route, bridge.http.shortcut): the
        200's body, an error in the one body shape, or None if the client went away."""
        try:
            return await self.accept(scope, receive)
        except FleetError as exc:
            self.count_error(exc)
            return error_response(exc)
        except Exception:  # a bug: logged, and still the one body shape
            log.exception("unexpected error in the webhook")
            return internal_error_response()

    def remember(self, norm: Normalized, envelope: Envelope) -> None:
        """Tell the agent a robot's state: not for a shop-level callback (no sn), which
        travels on the gateway's topic but is no robot; a robot named like the gateway is."""
        if norm.device_id is not None:
            self.agent.note_robot(envelope)

    def count(self, outcome: str, callback_type: str = "other") -> None:
        key = (outcome, callback_type if callback_type in _TYPE_LABELS else "other")
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = self.metrics.webhooks.labels(*key)
        child.inc()

    def count_error(self, exc: FleetError) -> None:
        if isinstance(exc, InputError):
            self.count(f"rejected_{status_for(exc)}")
        elif isinstance(exc, OutboxError):
            self.count("unavailable")

    async def accept(self, scope: Scope, receive: Receive) -> bytes | None:
        """Check, normalise, commit to the outbox; the 200 body, or None on disconnect."""
        started = time.perf_counter()
        given, declared = _headers(scope)
        # Constant-time comparison; an absent header compares like a wrong one.
        if not hmac.compare_digest(given, self.code):
            raise AuthError("missing or invalid CallbackCode header")
        raw = await _read_body(receive, declared, self.limit)
        if raw is None:
            return None
        try:
            parsed = strictjson.loads(raw)
        except PayloadError as exc:
            raise MalformedBodyError(f"body is {exc}") from None
        now = self.clock()
        gateway_clock = self.gateway_clock
        correction = gateway_clock.correction
        norm = normalize(parsed.value, received_at=now, max_skew=self.max_skew,
                         clock_offset=correction)
        device = norm.device_id or self.gateway
        gateway_clock.observe(device, norm.robot_ts, now)
        if norm.skewed and gateway_clock.correction != correction:
            # this robot's time completed the robots' verdict on the gateway's clock
            norm = normalize(parsed.value, received_at=now, max_skew=self.max_skew,
                             clock_offset=gateway_clock.correction)
        norm_notes = norm.notes
        if norm.skewed and norm.robot_ts is not None \
                and gateway_clock.undecided(device, norm.robot_ts, now):
            # one robot against the gateway: either clock may be wrong, so neither is
            # blamed (no robot_clock alert, not counted); still ordered by received_at
            undecided = _undecided(norm, now)
            norm_notes = tuple(undecided if n == norm.skew_note else n for n in norm.notes)
            log.info("robot %s: %s", device, undecided)
        elif norm.skewed:
            self.skewed.inc()
            log.warning("robot %s: %s", norm.device_id, norm.skew_note)
        ordering = self.clocks.order(device, None if norm.skewed else norm.robot_ts, now,
                                     gateway_clock.reference(now))
        if ordering.reset:
            self.agent.metrics.clock_resets.inc()
            log.warning("robot %s: %s", device, ordering.note)
        clock_notes = (ordering.note,) if ordering.note and not norm.skewed else ()
        if norm.robot_ts is None and norm.device_id is not None \
                and not norm.channel.startswith("callback/"):
            # how the cloud tells the gateway's stand-in from a robot time (docs/clocks.md)
            clock_notes = ("ts: no robot time in the callback; received_at stands in",)
        topic = str(self.agent.scheme.device(device, norm.channel))
        envelope = Envelope(
            id=norm.message_id, type=norm.callback_type, org=self.org, device=device,
            gateway=self.gateway, ts=norm.ts, received_at=now, data=norm.data,
            raw=norm.raw, channel=norm.channel,
            notes=(*parsed.notes, *norm_notes, *clock_notes),
        )
        if self.filtering and not self.policy.forwards(norm.channel, norm.callback_type):
            # Answered 200 so Pudu does not retry; the operator chose to keep it home.
            self.remember(norm, envelope)  # get_robots still knows it
            self.count("dropped", norm.callback_type)
            return self._answer(norm, now, topic, "callback accepted; not forwarded "
                                "(FORWARD_CHANNELS / DROP_TYPES)", forwarded=False)
        compact_key, hold = norm.compact_key, False
        if self.downsampler.applies(norm.channel):
            compact_key = f"{norm.channel}:{device}"
            verdict = self.downsampler.offer(compact_key, norm.channel, ordering.order)
            if verdict is Verdict.SUPERSEDED:
                # Older than what this robot already published on the channel: publishing
                # it now would put a stale state last. Answered 200 like any superseded one.
                self.remember(norm, envelope)
                self.count_downsampled(norm.channel)
                self.count("accepted", norm.callback_type)
                return self._answer(norm, now, topic, "callback accepted; superseded by a "
                                    "newer message of this robot (downsampled)")
            hold = verdict is Verdict.HOLD  # no await until the put
        # A retry is the same body, whatever its TraceId: Pudu reuses a TraceId for
        # different data, so the TraceId alone must not make a callback a duplicate.
        keys = [body_key(raw, norm.robot_ts)]
        payload = envelope.to_json()
        self.publishable(topic, payload, norm)
        result = await self.agent.outbox.put(
            topic, payload, qos=1, compact_key=compact_key, dedup_keys=keys,
            hold=hold, order=ordering.order,
        )
        self.remember(norm, envelope)
        if result.superseded:
            self.count_downsampled(norm.channel)
        duplicate = result is PutResult.DUPLICATE
        self.count("duplicate" if duplicate else "accepted", norm.callback_type)
        self.metrics.accept_seconds.observe(time.perf_counter() - started)
        return self._answer(
            norm, now, topic,
            "duplicate callback already accepted" if duplicate else "callback accepted",
            duplicate=duplicate)

    def publishable(self, topic: str, payload: bytes, norm: Normalized) -> None:
        """Refuse now (422, 413) what the broker would refuse later (AWS IoT: topic over
        256 bytes or 7 slashes, payload over 128 KiB): answered 200, it would only be set
        aside in the outbox's rejected table."""
        try:
            self.agent.transport.check_publish(topic, payload, 1)
        except TopicError as exc:
            field = "data.sn" if norm.device_id else "callback_type"
            raise InputError(f"{field} makes a topic the broker refuses: {exc.reason} "
                             f"({len(topic.encode())} bytes)", field=field) from None

    def count_downsampled(self, channel: str) -> None:
        child = self._downsampled.get(channel)
        if child is None:
            child = self._downsampled[channel] = self.metrics.downsampled.labels(channel)
        child.inc()

    @staticmethod
    def _answer(norm: Normalized, now: float, topic: str, message: str, *,
                duplicate: bool = False, forwarded: bool = True) -> bytes:
        # The body JSONResponse would send (compact, UTF-8, no NaN), without building one.
        return strictjson.dumps(accepted(norm, now, topic, message, duplicate=duplicate,
                                         forwarded=forwarded))


def create_app(agent: WebhookHost) -> FastAPI:
    """Build the public app around a running agent."""
    # Only the webhook and its health: /metrics and /docs are on the admin listener.
    app = ShortcutApp(title="Pudu edge agent", version=agent.version, docs_url=None,
                      redoc_url=None, openapi_url=None)
    app.state.webhook = _Webhook(agent)  # the docs route's too
    app.direct("POST", WEBHOOK_PATH, app.state.webhook.answer)
    app.state.agent = agent
    install_error_handlers(app)
    app.include_router(router)
    return app


#: The public app's routes.
router = APIRouter()


@router.post(WEBHOOK_PATH, openapi_extra=CALLBACK_REQUEST, responses=_WEBHOOK_RESPONSES,
             summary="Receive a Pudu callback and store it durably before answering 200")
async def pudu_webhook(request: Request) -> Response:
    # Reached only if the app's shortcut is bypassed; it is here for the docs.
    webhook = request.app.state.webhook
    try:
        payload = await webhook.accept(request.scope, request.receive)
    except FleetError as exc:
        webhook.count_error(exc)
        raise
    return Response(payload, media_type="application/json")


@router.get("/api/pudu/webhook/health", summary="Broker connection and outbox state",
            description="200 with `status` healthy|degraded while serving. `?ready=1`: 503 "
            "until the agent can take webhooks (listeners bound, outbox open) and while it "
            "stops; a broker outage never fails it. `?strict=1`: also 503 while degraded "
            "(for `curl -f` monitors).",
            responses=HEALTH_RESPONSES)
async def health(request: Request, agent: WebhookAgent) -> JSONResponse:
    query = HealthQuery(request.query_params)
    if agent.readiness.waiting_for("outbox"):  # not entered: no outbox to report on
        body = unready_body("edge-agent", agent.readiness.reasons())
    else:
        body = agent.health()
    not_ready = body["not_ready"]
    return JSONResponse(body, status_code=health_status(body, query, not_ready))
