"""Pudu Open API request signing (HMAC-SHA1), as pure functions (docs/pudu.md, "API 2").

The scheme is Tencent Cloud API Gateway's key-pair auth: a six-line signing string
(``x-date``, method, Accept, Content-Type, Content-MD5, path) signed with the app
secret. Two traps it sets: the query is *sent* percent-encoded but *signed* decoded,
and Content-MD5 is base64 of the 32-character hex MD5 string, not of the raw digest.
Nothing here logs or returns the secret; only the signature leaves, in a header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, unquote

__all__ = [
    "ACCEPT",
    "CONTENT_TYPE",
    "authorization",
    "body_bytes",
    "content_md5",
    "encode_query",
    "sign",
    "signed_headers",
    "signing_string",
    "x_date",
]

ACCEPT = "application/json"
CONTENT_TYPE = "application/json"

Params = Mapping[str, Any]


def x_date(now: float) -> str:
    """RFC 1123 GMT with English names (``Wed, 01 Jan 2025 00:00:00 GMT``), locale-free."""
    return formatdate(now, usegmt=True)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def encode_query(params: Params) -> str:
    """The query as sent: keys sorted by code point, every value percent-encoded with
    nothing left unescaped, a list as ``k=v1,v2`` (comma literal), an empty value bare."""
    parts = []
    for key in sorted(params):
        value = params[key]
        name = quote(str(key), safe="")
        if isinstance(value, (list, tuple)):
            value = ",".join(quote(_value(v), safe="") for v in value)
            parts.append(f"{name}={value}" if value else name)
        elif value is None or _value(value) == "":
            parts.append(name)
        else:
            parts.append(f"{name}={quote(_value(value), safe='')}")
    return "&".join(parts)


def body_bytes(body: Any) -> bytes:
    """Compact JSON, raw UTF-8: serialised once, so the hashed bytes are the sent ones."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def content_md5(body: bytes | None) -> str:
    """Empty for a GET; else base64 of the lowercase hex MD5 string of the body (44 chars)."""
    if not body:
        return ""
    return base64.b64encode(hashlib.md5(body).hexdigest().encode("ascii")).decode("ascii")


def signing_string(date: str, method: str, md5: str, path: str, query: str = "") -> str:
    """The six lines, no trailing newline; ``path`` includes ``/pudu-entry``, ``query``
    is the encoded query (signed decoded)."""
    signed_path = f"{path}?{unquote(query)}" if query else path
    return "\n".join((f"x-date: {date}", method.upper(), ACCEPT, CONTENT_TYPE, md5,
                      signed_path))


def sign(secret: str, string: str) -> str:
    """base64(HMAC-SHA1(secret, string)), both UTF-8."""
    mac = hmac.new(secret.encode("utf-8"), string.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def authorization(key: str, signature: str) -> str:
    return (f'hmac id="{key}", algorithm="hmac-sha1", headers="x-date", '
            f'signature="{signature}"')


def signed_headers(*, key: str, secret: str, method: str, path: str, query: str = "",
                   body: bytes | None = None, now: float) -> dict[str, str]:
    """Every header one request needs (Accept and Content-Type on GET too)."""
    date = x_date(now)
    md5 = content_md5(body)
    signature = sign(secret, signing_string(date, method, md5, path, query))
    return {"Accept": ACCEPT, "Content-Type": CONTENT_TYPE, "Content-MD5": md5,
            "x-date": date, "Authorization": authorization(key, signature)}


def parse_authorization(header: str) -> dict[str, str]:
    """``hmac id="k", algorithm="hmac-sha1", ...`` -> its fields (the stub verifies by it)."""
    head, _, rest = header.strip().partition(" ")
    if head.lower() != "hmac":
        return {}
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, value = part.strip().partition("=")
        if eq:
            fields[name.strip().lower()] = value.strip().strip('"')
    return fields

