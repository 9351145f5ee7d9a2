"""The cloud's SQLite default on a full disk (issue 24): an outage, not a crash.

The callback server's database sits on a 2 MiB tmpfs the test mounts (root only; CI runs
as root). HTTP ingest is posted until the disk is full: the server answers 503 at once,
saying the disk is full (never waits out its commit deadline, never 200 for what it could
not keep), health says `degraded` with the reason, and once the tmpfs is remounted larger
the same server accepts and stores again within seconds.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callback_server import ingest
from callback_server import settings as cb_config
from callback_server.service import CallbackServer
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")

RULE, ADMIN = "rule-token", "admin-token"


@pytest.fixture
async def server(small_fs: Path, tmp_path: Path) -> AsyncIterator[
        tuple[CallbackServer, httpx.AsyncClient]]:
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://b{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": f"sqlite:///{small_fs / 'cb.db'}",
        "API_KEYS_FILE": str(tmp_path / "keys.yaml"),
        "CALLBACK_TOKEN": RULE, "PROXY_TOKEN": ADMIN})
    async with CallbackServer(settings) as srv, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=srv.app), base_url="http://cb",
            timeout=30) as client:
        yield srv, client


def envelope(i: int) -> dict[str, object]:
    return {"v": 1, "id": f"d{i}", "type": "robotErrorWarning", "channel": "event",
            "org": "acme", "device": f"R{i % 5}", "gateway": "site-a", "ts": time.time(),
            "data": {"event_id": f"e{i}", "event_level": "warning",
                     "event_detail": "x" * 20_000 + str(i)}, "raw": {}}


async def test_cloud_sqlite_on_a_full_disk_degrades_then_recovers_without_restart(
        server: tuple[CallbackServer, httpx.AsyncClient], small_fs: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv, client = server
    # An answer that waited for the database to commit "in time" would take 30 s: each
    # one within a second shows the full disk is refused at once, not waited on.
    monkeypatch.setattr(ingest, "INGEST_TIMEOUT_SECONDS", 30.0)
    headers = {"X-Callback-Token": RULE}
    answers: list[int] = []
    for i in range(400):
        started = time.monotonic()
        r = await client.post("/callback/messages", json=envelope(i), headers=headers)
        assert time.monotonic() - started < 1, f"answer {i} ({r.status_code}) waited"
        answers.append(r.status_code)
        if r.status_code == 503:
            assert r.headers.get("retry-after"), r.headers
            assert "disk is full" in r.json()["message"], r.text
            break
        assert r.status_code == 200, r.text
    assert answers[-1] == 503 and answers.count(200) > 5, f"the disk never filled: {answers}"
    held = srv.writer.held  # the message the full disk refused stays queued, retried
    for i in range(400, 410):  # while the disk stays full: refused before any wait
        started = time.monotonic()
        r = await client.post("/callback/messages", json=envelope(i), headers=headers)
        assert time.monotonic() - started < 1, f"answer {i} waited"
        assert r.status_code == 503 and "disk is full" in r.json()["message"], r.text
    assert srv.writer.held == held  # none of them queued: nothing waited on the writer
    health = (await client.get("/callback/health",
                               headers={"Authorization": f"Bearer {ADMIN}"})).json()
    assert health["status"] == "degraded", health
    assert any("disk is full" in r for r in health["reasons"]), health
    await asyncio.to_thread(
        subprocess.run, ["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    await eventually_async(  # polling the service's own answer
        lambda: client.post("/callback/messages", json=envelope(10_000), headers=headers),
        accept=lambda r: r.status_code == 200, within=5, every=0.2,
        what="a message accepted within 5 s of the remount")

    async def health_now() -> dict[str, Any]:
        got = await client.get("/callback/health", headers={"Authorization": f"Bearer {ADMIN}"})
        return got.json()  # type: ignore[no-any-return]

    await eventually_async(health_now, accept=lambda h: h["status"] == "healthy", within=60,
                           every=0.5, what="healthy after the remount")
    assert await srv.store.get_robot("R0") is not None


def shown_free(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'callback_free_bytes{{path="{name}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no callback_free_bytes for {name}: {metrics[-2000:]}")


async def test_the_free_space_of_the_sqlite_disk_is_shown_before_it_fills(
        server: tuple[CallbackServer, httpx.AsyncClient], small_fs: Path) -> None:
    """/health and /metrics show the room left where the database is (the 2 MiB tmpfs)
    and in the data directory: it shrinks as messages are stored and grows back when the
    filesystem does."""
    _, client = server
    admin = {"Authorization": f"Bearer {ADMIN}"}

    async def free() -> int:
        health = (await client.get("/callback/health", headers=admin)).json()
        metrics = (await client.get("/metrics", headers=admin)).text
        assert health["free_bytes"]["data"] is not None
        database = health["free_bytes"]["database"]
        # read a moment apart: the server's own writes may move it by a few pages
        assert abs(shown_free(metrics, "database") - database) < 256 * 1024
        return int(database)

    before = await free()
    assert 0 < before <= 2 * 2**20
    for i in range(10):
        r = await client.post("/callback/messages", json=envelope(i),
                              headers={"X-Callback-Token": RULE})
        assert r.status_code == 200, r.text
    fuller = await free()
    assert fuller < before - 100_000  # ten messages of 20 kB
    await asyncio.to_thread(
        subprocess.run, ["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    assert await free() > 32 * 2**20


def test_only_a_sqlite_file_has_a_database_disk(tmp_path: Path) -> None:
    from callback_server.disk import watched
    assert watched("sqlite:////srv/cb/callback.db", tmp_path) == {
        "data": tmp_path, "database": Path("/srv/cb")}
    assert watched("sqlite:///data/callback.db", tmp_path)["database"] == Path("data")
    for url in ("mysql://u:p@db:3306/fleet", "sqlite:///:memory:"):
        assert watched(url, tmp_path) == {"data": tmp_path}
    assert watched("mysql://db/fleet", tmp_path / "absent") == {"data": Path.cwd()}
