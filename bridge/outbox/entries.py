"""What goes in and out of the outbox: entries, put results, and the ops the event loop
hands the writer thread (one list per loop tick, one transaction per list)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

from bridge.outbox.dedup import Key


class PutResult(enum.Enum):
    """What happened to a put."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    #: Held (``hold=True``): nothing was held under its key before.
    HELD = "held"
    #: Held, and the older entry held under its key was dropped (superseded).
    REPLACED = "replaced"
    #: Not stored: a newer entry (by ``order``) is held under its key (superseded).
    STALE = "stale"

    @property
    def superseded(self) -> bool:
        """One message fewer will be published because of this put."""
        return self in (PutResult.REPLACED, PutResult.STALE)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One message waiting for its PUBACK."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class _Put:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    compact_key: str | None
    dedup_keys: tuple[Key, ...]
    future: asyncio.Future[PutResult]
    hold: bool = False
    order: float = 0.0


@dataclass(slots=True)
class _Remove:
    seqs: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Reject:
    seq: int
    reason: str


@dataclass(slots=True)
class _Requeue:
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Release:
    keys: tuple[str, ...] | None  # None: everything held
    future: asyncio.Future[int] | None


STOP = object()



@dataclass(slots=True)
class _Commit:
    """What one transaction did, handed to the event loop in one call."""

    results: list[tuple[asyncio.Future[Any], Any]]
    added: list[OutboxEntry]
    reordered: bool  # compaction, rejection, requeue or rollback: the tail is stale
    removed: list[int]  # seqs whose removal this transaction wrote
