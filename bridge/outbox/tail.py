"""The outbox's in-memory tail: entries committed since the publisher last caught up.

A publisher that keeps up reads what it publishes from here instead of from SQLite
through a worker thread (that SELECT and its thread hand-offs were ~60 µs per put at
2k puts/s). Anything that changes the stored order or set (compaction, rejection,
requeue, a failed write) resets it, and peeks go to SQLite until one reaches the end.
"""

from __future__ import annotations

from bridge.outbox.entries import OutboxEntry

__all__ = ["TAIL_MAX", "Tail"]

#: Beyond this many entries (publisher far behind) the tail is dropped: the publisher
#: reads from SQLite until it has caught up.
TAIL_MAX = 4096


class Tail:
    """Committed entries with ``seq > start``, in seq order; ``start`` None: not tracking."""

    def __init__(self) -> None:
        self.start: int | None = None
        self._entries: dict[int, OutboxEntry] = {}

    def covers(self, after_seq: int) -> bool:
        return self.start is not None and after_seq >= self.start

    def track_from(self, seq: int) -> None:
        """A read saw every committed entry up to ``seq``: each later one will come here."""
        self.start = seq
        self._entries.clear()

    def reset(self) -> None:
        self.start = None
        self._entries.clear()

    def discard(self, seq: int) -> None:
        self._entries.pop(seq, None)

    def extend(self, added: list[OutboxEntry]) -> None:
        if self.start is None:
            return
        floor = self.start
        for entry in added:
            if entry.seq > floor:
                self._entries[entry.seq] = entry
        if len(self._entries) > TAIL_MAX:
            self.reset()

    def peek(self, after_seq: int, limit: int) -> list[OutboxEntry]:
        out: list[OutboxEntry] = []
        for seq, entry in self._entries.items():
            if seq > after_seq:
                out.append(entry)
                if len(out) >= limit:
                    break
        return out
