"""Private by default: started with umask 022, both services create their SQLite files
0600 (WAL and SHM included) and the directories they make 0700."""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.services import callback_server, edge_agent

pytestmark = pytest.mark.integration


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual login umask, which the services inherit; restored afterwards."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_edge_outbox_and_its_wal_are_private(tmp_path: Path, umask_022: None) -> None:
    outbox = tmp_path / "made" / "by" / "agent" / "outbox.db"
    tmp_path.chmod(0o755)  # a directory that was there: not the agent's to change
    with edge_agent(tmp_path, "mqtt://127.0.0.1:1883", org=f"fm{uuid.uuid4().hex[:6]}",
                    OUTBOX_PATH=str(outbox)) as agent:
        r = httpx.post(agent.url + "/api/pudu/webhook", headers={"CallbackCode": "test-code"},
                       timeout=10, content=json.dumps({
                           "callback_type": "notifyRobotPower",
                           "data": {"sn": "FM1", "power": 50, "charge_stage": "idle"}}))
        assert r.status_code == 200, r.text
        files = {p.name: mode(p) for p in outbox.parent.iterdir()}
    assert {"outbox.db", "outbox.db-wal", "outbox.db-shm"} <= set(files), files
    assert all(m == 0o600 for m in files.values()), {k: oct(v) for k, v in files.items()}
    for directory in (tmp_path / "made", tmp_path / "made" / "by", outbox.parent):
        assert mode(directory) == 0o700, directory
    assert mode(tmp_path) == 0o755


def test_callback_server_database_and_its_wal_are_private(tmp_path: Path,
                                                          umask_022: None) -> None:
    db = tmp_path / "cbdata" / "callback.db"
    with callback_server(tmp_path, "mqtt://127.0.0.1:1883", f"sqlite:///{db}") as server:
        assert server.health()["status"] in ("healthy", "degraded")
        files = {p.name: mode(p) for p in db.parent.iterdir()}
    assert {"callback.db", "callback.db-wal"} <= set(files), files
    assert all(m == 0o600 for m in files.values()), {k: oct(v) for k, v in files.items()}
    assert mode(db.parent) == 0o700


async def test_files_left_0644_from_before_are_tightened(tmp_path: Path,
                                                         umask_022: None) -> None:
    from bridge.outbox import Outbox

    path = tmp_path / "old.db"
    async with Outbox(path):
        pass
    loosen(tmp_path)
    async with Outbox(path):
        modes = modes_in(tmp_path)
    assert modes and all(m == 0o600 for m in modes.values()), modes


def loosen(directory: Path) -> None:
    for p in directory.iterdir():
        p.chmod(0o644)


def modes_in(directory: Path) -> dict[str, int]:
    return {p.name: mode(p) for p in directory.iterdir()}
