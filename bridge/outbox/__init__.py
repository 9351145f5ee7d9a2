"""The durable outbox (SQLite, WAL, one group-committing writer thread), as a package:

- ``core.py``: ``Outbox``, the queue itself, its bound, dedup, rejected and held tables;
- ``entries.py``: what goes in and out, and the writer's ops;
- ``schema.py``: the tables and the per-batch statements;
- ``tail.py``: the in-memory tail a publisher that keeps up reads from.
"""

from __future__ import annotations

from bridge.outbox.core import Outbox
from bridge.outbox.entries import OutboxEntry, PutResult
from bridge.outbox.schema import SCHEMA

__all__ = ["SCHEMA", "Outbox", "OutboxEntry", "PutResult"]
