"""Checking the ``X-Signature`` of a ``callback_url`` push or an alert webhook."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["verify_signature"]


def verify_signature(body: bytes | str, header: str | None, secret: str | bytes) -> bool:
    """True when ``header`` is ``sha256=<hex HMAC-SHA256(secret, body)>`` for these bytes.

    ``body`` must be the raw request body as received (re-serialised JSON differs in
    whitespace and key order). The comparison is constant-time; a missing header, another
    scheme or malformed hex is simply False.
    """
    if not header:
        return False
    scheme, sep, given = header.strip().partition("=")
    if not sep or scheme.strip().lower() != "sha256":
        return False
    raw = body.encode("utf-8") if isinstance(body, str) else body
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    expected = hmac.new(key, raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(given.strip().lower().encode("ascii", "replace"),
                               expected.encode("ascii"))
