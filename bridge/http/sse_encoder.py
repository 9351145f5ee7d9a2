"""Server-Sent-Events framing: the one encoder every streaming route uses
(``GET /mqtt/stream``, ``GET /console/stream``)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["KEEPALIVE", "sse_event"]

#: A comment line: keeps proxies and idle timers from closing a quiet stream.
KEEPALIVE = b": keepalive\n\n"


def sse_event(name: str, data: Any) -> bytes:
    """One SSE event; json.dumps escapes newlines, so the data is one line."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
