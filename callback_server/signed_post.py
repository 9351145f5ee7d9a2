"""The one signed, retried POST of every outbound webhook (event webhooks and the alert
subscriptions that are a view of them).

Its own module so that the webhook and alert packages share it without importing each
other. A POST is signed ``X-Signature: sha256=<hex HMAC-SHA256(secret, body)>`` (the
scheme of ``callback_url`` pushes; ``bridge.verify_signature`` checks it), sent by the
outbound client (``bridge.http.outbound``: no private address unless ``CALLBACK_URL_ALLOW``),
and retried with full-jitter exponential back-off up to ``attempts`` times
(FORWARD_TIMEOUT / FORWARD_MAX_RETRIES); each attempt is told to ``record``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.backoff import backoff_delay
from bridge.errors import OutboundRefusedError
from bridge.proxy import sign

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: ``record(attempt, status, latency_ms, outcome)``: one row of a delivery log.
Record = Callable[[int, int | None, float | None, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Retry:
    """How many attempts and how long to wait between them."""

    attempts: int
    base_seconds: float
    cap_seconds: float


async def post_signed(http: httpx.AsyncClient, url: str, secret: str, body: bytes,
                      headers: Mapping[str, str], retry: Retry, record: Record) -> str:
    """POST ``body`` signed, retrying within bounds; the outcome (``delivered``,
    ``gave_up`` or ``refused``). A refusal by the outbound rule is not retried, nor a
    4xx other than 408/429 (nor a 3xx: no redirects are followed)."""
    import httpx  # loaded by ``client`` already

    sent = {"Content-Type": "application/json", **headers, "X-Signature": sign(secret, body)}
    outcome = "gave_up"
    for attempt in range(1, retry.attempts + 1):
        retryable, status, started = True, None, time.monotonic()
        try:
            response = await http.post(url, content=body, headers=sent)
        except OutboundRefusedError:
            outcome, retryable = "refused", False  # checked at connect: not retried
        except httpx.HTTPError as exc:
            log.info("webhook POST to %s attempt %d: %s", url, attempt, type(exc).__name__)
            outcome = "failed"
        else:
            status = response.status_code
            if response.is_success:
                outcome = "delivered"
            else:
                retryable = status >= 500 or status in (408, 429)
                outcome = "failed"
        latency = round((time.monotonic() - started) * 1000, 1)
        last = attempt == retry.attempts or not retryable
        if outcome == "failed" and last:
            outcome = "gave_up"
        await record(attempt, status, latency, outcome)
        if outcome == "delivered" or last:
            return outcome
        await asyncio.sleep(backoff_delay(attempt, retry.base_seconds, retry.cap_seconds))
    return outcome
