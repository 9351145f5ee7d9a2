"""``edge-agent outbox stats | peek``: what is waiting, read-only, beside a running agent.

The file is opened read-only (``mode=ro``); in WAL mode a reader never blocks the
agent's writer nor sees a half-written commit, so this is safe while the agent runs.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bridge.errors import OutboxError

__all__ = ["backup", "peek_entries", "stats"]


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; OutboxError (one line for the operator) for a missing
    file, a directory, an empty or foreign database or no database at all."""
    if not path.exists():
        raise OutboxError(f"no outbox at {path} (OUTBOX_PATH)")
    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            yield conn
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise OutboxError(f"cannot read {path} as an outbox (OUTBOX_PATH): {exc}") from exc


def _channel(topic: str) -> str:
    parts = topic.split("/")
    return "/".join(parts[parts.index("device") + 2:]) if "device" in parts else topic


def stats(path: Path) -> dict[str, Any]:
    """Depth, oldest and newest age, rejected entries, file size and depth per channel."""
    now = time.time()
    with _reading(path) as conn:
        depth, oldest, newest = conn.execute(
            "SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM outbox").fetchone()
        rejected = conn.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]
        has_held = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                " AND name = 'held'").fetchone()
        # Held for downsampling (an outbox older than downsampling has no such table).
        held = conn.execute("SELECT COUNT(*) FROM held").fetchone()[0] if has_held else 0
        by_channel: dict[str, int] = {}
        for (topic,) in conn.execute("SELECT topic FROM outbox"):
            channel = _channel(topic)
            by_channel[channel] = by_channel.get(channel, 0) + 1
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    return {
        "path": str(path), "depth": depth, "rejected": rejected, "held": held,
        "oldest_age_s": None if oldest is None else round(now - oldest, 1),
        "newest_age_s": None if newest is None else round(now - newest, 1),
        "bytes_on_disk": size, "by_channel": dict(sorted(by_channel.items())),
    }


def peek_entries(path: Path, count: int) -> list[dict[str, Any]]:
    """The ``count`` oldest entries, in the order they will be published."""
    now = time.time()
    out = []
    with _reading(path) as conn:
        rows = conn.execute("SELECT seq, topic, payload, qos, created_at FROM outbox "
                            "ORDER BY seq LIMIT ?", (count,)).fetchall()
    for seq, topic, payload, qos, created in rows:
        try:
            body: Any = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            body = bytes(payload)[:200].decode("utf-8", "replace")
        out.append({"seq": seq, "topic": topic, "qos": qos,
                    "age_s": round(now - created, 1), "payload": body})
    return out


def backup(path: Path, dest: Path) -> dict[str, Any]:
    """A consistent copy of the outbox while the agent runs (SQLite's online backup: a
    snapshot of one committed state, WAL included), written beside ``dest`` and renamed
    into place so a half-made copy is never mistaken for a backup. Restore: stop the
    agent, put the copy at OUTBOX_PATH (the agent's user, mode 0600), start it."""
    if dest.exists():
        raise OutboxError(f"{dest} exists: give a new file name for the backup")
    partial = dest.with_name(dest.name + ".partial")
    with _reading(path) as conn:
        try:
            with contextlib.closing(sqlite3.connect(partial)) as out:
                conn.backup(out)
                depth = out.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise OutboxError(f"cannot write the backup {dest}: {exc}") from exc
    partial.chmod(0o600)
    partial.rename(dest)
    return {"backup": str(dest), "entries": depth, "bytes": dest.stat().st_size}
