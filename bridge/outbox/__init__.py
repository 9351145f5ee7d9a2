"""The durable outbox (SQLite, WAL, one group-committing writer thread), as a package:

- ``core.py``: ``Outbox``, the queue itself, its bound and compaction, the writer thread;
- ``dedup.py``: retry keys seen within the TTL;
- ``rejected.py``: entries the broker refused for good, set aside and requeued;
- ``held.py``: what the downsampler holds until its interval ends;
- ``entries.py``: what goes in and out, and the writer's ops;
- ``schema.py``: the tables;
- ``tail.py``: the in-memory tail a publisher that keeps up reads from.
"""

from __future__ import annotations

from bridge.outbox.core import Outbox
from bridge.outbox.dedup import body_key
from bridge.outbox.entries import OutboxEntry, PutResult
from bridge.outbox.schema import SCHEMA

__all__ = ["SCHEMA", "Outbox", "OutboxEntry", "PutResult", "body_key"]
