"""The project's one exception tree.

    FleetError
    ├── ConfigError            settings missing or invalid (startup refuses to run)
    ├── TopicError             a topic or filter that MQTT (or AWS IoT) would refuse
    │   └── TopicNotAllowedError  valid, but outside what this caller may touch
    ├── PayloadError           a payload that cannot be published (too large, not JSON)
    │   ├── PayloadTooLargeError
    │   ├── DepthError         JSON nested deeper than the limit (refused before parsing)
    │   └── MalformedCommandError  a command that cannot run (answered if it has an id)
    ├── InputError             a webhook/HTTP request we cannot accept (field named)  422
    │   ├── MalformedBodyError a body (or its Content-Length) that cannot be parsed    400
    │   ├── AuthError          wrong or missing shared secret                          401
    │   ├── ForbiddenError     role, orgs or origin do not cover the request           403
    │   ├── NotFoundError      no such object (or one the caller may not see)          404
    │   ├── ConflictError      the object's state forbids it (resolved, in use)        409
    │   ├── BodyTooLargeError  a request body over the configured limit                413
    │   ├── RateLimitedError   too many requests from this caller: retry later         429
    │   ├── CapacityError      a bounded resource is full (console streams)            503
    │   └── OutboundRefusedError  a URL we may not send to (not globally routable)     422
    ├── CommandTimeoutError    a device did not answer a command in time
    ├── ServiceError           a REST API (FleetClient) answered with an unexpected status
    │   └── ServiceUnreachableError  no HTTP answer at all (refused, reset, timed out)
    ├── TransportError         the broker connection failed or refused an operation
    │   ├── NotConnectedError
    │   ├── PubackTimeoutError
    │   └── PublishRefusedError  the broker's PUBACK carried a failure reason code
    ├── OutboxError            the durable outbox could not take or give a message
    │   ├── OutboxFullError    bounded outbox is full of entries that may not be dropped
    │   ├── OutboxUnwritableError  its disk is full or failing; the writer retries by itself
    │   └── OutboxLockedError  another process has the outbox open (exit code 3)
    ├── StoreError             the database is unreachable or busy: retry later
    │   ├── StoreFullError     its disk is full; the writer retries by itself
    │   └── StoreRejectedError the database refused this data: retrying will not help
    └── PuduApiError           a Pudu cloud API call failed (path, trace_id, message)
        ├── PuduAuthError      401/403: key, secret, clock or API not enabled; not retried
        ├── PuduRateLimitError 429 or a "rate limit" message; retried with back-off
        ├── PuduServerError    5xx, timeout or connection failure; retried with back-off
        │   └── PuduConnectError  no connection made: the request never went out
        └── PuduBusinessError  HTTP 200 whose message is not SUCCESS: the API said no

The statuses on the right are chosen in one place,
``bridge.http.error_boundary.status_for``: a raise site picks the class that says
what went wrong, never a number.

Third-party errors (paho return codes, awscrt, aiomysql, sqlite3) are translated to
these once, in the module that talks to that library, with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


class FleetError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(FleetError):
    """Settings are missing or invalid."""


class TopicError(FleetError):
    """A topic or topic filter is invalid."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"invalid topic {topic!r}: {reason}")
        self.topic = topic
        self.reason = reason


class TopicNotAllowedError(TopicError):
    """A valid topic or filter this caller may not touch (``$``-topics, foreign prefixes)."""


class PayloadError(FleetError):
    """A payload cannot be published."""


class PayloadTooLargeError(PayloadError):
    """The payload (or request body) is over the configured limit."""

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class DepthError(PayloadError):
    """A JSON document nests deeper than the limit (checked before the recursive parse)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"JSON nests deeper than {limit} levels (the limit)")
        self.limit = limit


class MalformedCommandError(PayloadError):
    """A command that cannot run; ``message_id`` when it has one (it is then answered)."""

    def __init__(self, message: str, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message_id = message_id


class InputError(FleetError):
    """An inbound body cannot be accepted; ``field`` names the culprit when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class MalformedBodyError(InputError):
    """The body (or a header it depends on) is not parseable as what the route takes."""


class ForbiddenError(InputError):
    """The caller is known but its role, orgs or origin do not cover this request."""


class ConflictError(InputError):
    """The object exists but its state forbids the request (resolved, already in use)."""


class BodyTooLargeError(InputError):
    """The request body is over the configured limit (refused before it is all read)."""


class RateLimitedError(InputError):
    """This caller has too many requests outstanding; the same request may pass later."""


class CapacityError(InputError):
    """A bounded server resource (console streams) is full; retry later, nothing is wrong
    with the request or the database."""


class AuthError(InputError):
    """Wrong or missing shared secret; ``bearer``: answer with ``WWW-Authenticate``."""

    def __init__(self, message: str = "missing or invalid CallbackCode", *,
                 bearer: bool = False) -> None:
        super().__init__(message)
        self.bearer = bearer


class NotFoundError(InputError):
    """No such object, or one the caller may not see (never confirm that it exists)."""


class CommandTimeoutError(FleetError):
    """The device did not answer within the timeout; the command may still run."""

    def __init__(self, device_id: str, seconds: float, message_id: str) -> None:
        super().__init__(f"no response from {device_id} within {seconds:g} s "
                         f"(messageId {message_id})")
        self.device_id = device_id
        self.seconds = seconds
        self.message_id = message_id


class ServiceError(FleetError):
    """A service's REST API answered a FleetClient request with an unexpected status."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ServiceUnreachableError(ServiceError):
    """No HTTP answer at all: connection refused or reset, or the request timed out."""


class OutboundRefusedError(InputError):
    """An outbound URL whose host is, or resolves to, an address we may not connect to.

    Raised when a ``callback_url`` is given (422) and again at each delivery, before
    connecting, so a name that later resolves elsewhere (DNS rebinding) is caught too.
    """

    def __init__(self, message: str, *, host: str, field: str = "callback_url") -> None:
        super().__init__(message, field=field)
        self.host = host


class TransportError(FleetError):
    """The broker connection failed or refused an operation."""


class NotConnectedError(TransportError):
    """The operation needs a broker connection and there is none."""


class PubackTimeoutError(TransportError):
    """No PUBACK in time; the transport keeps the message, so it may still arrive."""


class PublishRefusedError(TransportError):
    """The broker answered a publish with a failure reason code (MQTT 5 PUBACK).

    ``permanent`` codes (not authorised, bad topic, bad payload, too large) fail again on
    every resend; the rest (quota exceeded, unspecified, busy) may pass later.
    """

    PERMANENT = frozenset({0x87, 0x90, 0x95, 0x99})

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(f"broker refused publish: {reason} (0x{code:02x})")
        self.reason = reason
        self.code = code

    @property
    def permanent(self) -> bool:
        return self.code in self.PERMANENT


class OutboxError(FleetError):
    """The durable outbox failed."""


class OutboxFullError(OutboxError):
    """The outbox is at its bound and holds nothing that may be dropped."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"outbox full ({depth}/{limit} entries); retry later")
        self.depth = depth
        self.limit = limit


class OutboxUnwritableError(OutboxError):
    """The outbox's last write failed (disk full, I/O error): an outage, not a crash.

    Puts are refused at once (503 + Retry-After) until a retried write succeeds."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"outbox cannot write ({reason}); retry later")
        self.reason = reason


class OutboxLockedError(OutboxError):
    """Another process (a second agent) holds the outbox; two writers would interleave."""

    def __init__(self, path: str) -> None:
        super().__init__(f"outbox {path} is in use by another process (is an edge agent "
                         "already running with this OUTBOX_PATH?)")
        self.path = path


class StoreError(FleetError):
    """The database is unreachable or refused a write."""


class StoreFullError(StoreError):
    """The database's disk is full (SQLite's ``SQLITE_FULL``, ``ENOSPC``): an outage the
    writer retries by itself, answered 503 at once while it lasts, saying so (a caller
    told the disk is full knows retrying soon will not help). ``detail`` is the
    database's own words, for the log."""

    def __init__(self, detail: str) -> None:
        super().__init__("the database's disk is full; retry once space is freed")
        self.detail = detail


class StoreRejectedError(StoreError):
    """The database refused the data itself (constraint, type); the same write fails again."""


class PuduApiError(FleetError):
    """A Pudu Open API call failed; ``message`` is Pudu's own word where it gave one.

    Never carries the secret or a signature: only the path, Pudu's trace id and message.
    """

    def __init__(self, message: str, *, path: str, status: int | None = None,
                 trace_id: str | None = None, retries: int = 0) -> None:
        super().__init__(f"Pudu API {path}: {message}")
        self.message = message
        self.path = path
        self.status = status
        self.trace_id = trace_id
        self.retries = retries


class PuduAuthError(PuduApiError):
    """The API refused our key or signature (or the API is not enabled for the key)."""


class PuduRateLimitError(PuduApiError):
    """HTTP 429 or a rate-limit message, still so after the bounded retries."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class PuduServerError(PuduApiError):
    """5xx, a timeout or a connection failure, still so after the bounded retries."""


class PuduConnectError(PuduServerError):
    """No connection was made, so the request provably never reached the API: the one
    server failure a non-idempotent command may retry."""


class PuduBusinessError(PuduApiError):
    """HTTP 200 with a ``message`` other than SUCCESS (PARAM_ERROR, robot offline, ...)."""
