"""Times as the API shows them: one format, shared by alerts and webhooks alike."""

from __future__ import annotations

import datetime as dt


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds, as every other API time is."""
    if ts is None:
        return None
    value = dt.datetime.fromtimestamp(float(ts), dt.UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
