"""Batch frames: many envelopes in one publish during a drain (``BATCH_FRAMES=on``).

AWS IoT Core bills every publish per started 5 KiB and caps a connection at 100
publishes/s, so a backlog of small envelopes drains (and costs) far better packed:
``{"v": 1, "batch": [<envelope>, ...]}`` on ``{prefix}org/{org}/device/{gateway}/batch``.
Each element is a complete envelope, checked on its own by the receiver (the per-element
ingest contract): one bad element never fails the frame. A frame stays within AWS's
128 KiB payload limit and is filled to whole 5 KiB billing units (``FRAME_BYTES`` is 25
units).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from bridge.errors import PayloadError

FRAME_VERSION = 1
#: AWS IoT Core bills a publish per started 5 KiB.
BILLING_UNIT = 5 * 1024
#: At most 128 KiB (AWS's payload limit), in whole billing units: 25 x 5 KiB = 125 KiB.
FRAME_BYTES = (128 * 1024 // BILLING_UNIT) * BILLING_UNIT
_HEAD = b'{"v":1,"batch":['
_TAIL = b"]}"


def billed_units(size: int) -> int:
    """AWS's billed 5 KiB units for a payload of ``size`` bytes (at least one)."""
    return max(1, -(-size // BILLING_UNIT))


def pack(payloads: Iterable[bytes], limit: int = FRAME_BYTES) -> Iterator[tuple[int, bytes]]:
    """Frames of the envelope ``payloads`` (each already JSON), in order, greedily
    filled up to ``limit`` bytes; yields (how many elements, frame). A payload too big to
    share a frame goes alone."""
    parts: list[bytes] = []
    size = len(_HEAD) + len(_TAIL)
    for payload in payloads:
        extra = len(payload) + (1 if parts else 0)
        if parts and size + extra > limit:
            yield len(parts), _HEAD + b",".join(parts) + _TAIL
            parts, size, extra = [], len(_HEAD) + len(_TAIL), len(payload)
        parts.append(payload)
        size += extra
    if parts:
        yield len(parts), _HEAD + b",".join(parts) + _TAIL


def fits(size: int, payload: bytes, limit: int = FRAME_BYTES) -> bool:
    """Whether ``payload`` still fits a frame whose elements total ``size`` bytes."""
    return len(_HEAD) + len(_TAIL) + size + len(payload) + 1 <= limit


def elements(frame: Any) -> list[Any]:
    """The elements of a decoded frame; PayloadError when it is not one."""
    if not isinstance(frame, dict) or not isinstance(frame.get("batch"), list):
        raise PayloadError('a batch frame must be an object with a "batch" array')
    version = frame.get("v", FRAME_VERSION)
    if type(version) is not int or version != FRAME_VERSION:
        raise PayloadError(f"batch frame v must be {FRAME_VERSION}")
    return list(frame["batch"])


def is_frame(obj: Any) -> bool:
    """A decoded body that is a frame rather than an envelope (HTTP ingest)."""
    return isinstance(obj, dict) and "batch" in obj and "id" not in obj
