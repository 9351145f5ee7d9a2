"""The outbox file's tables (each one's statements live in the module that owns it)."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    retain INTEGER NOT NULL DEFAULT 0,
    compact_key TEXT,
    created_at REAL NOT NULL,
    ord REAL
);
-- outbox_compact indexed compact_key until its page in every put was found dearer than
-- what bridge/outbox/compaction.py remembers instead: files made before lose it here.
DROP INDEX IF EXISTS outbox_compact;
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    reason TEXT NOT NULL,
    rejected_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
-- seen was indexed by at until the index's page in every commit was found dearer than
-- the ranges of keys dedup.prune reads instead: files made before lose it here.
DROP INDEX IF EXISTS seen_at;
CREATE TABLE IF NOT EXISTS held (
    compact_key TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    ord REAL NOT NULL,
    held_at REAL NOT NULL
) WITHOUT ROWID;
"""
