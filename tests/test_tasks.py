"""bridge.service.taskset.TaskSet: named tasks, a crash logged and escalated, a bounded stop that
never raises; and what the services make of it (an orderly stop, exit code 4)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from types import TracebackType

import pytest
from fastapi import FastAPI

from bridge.errors import FleetError
from bridge.http.server import NodelayStats, make_server
from bridge.service.lifecycle import EXIT_FAILED, Listener, run_main, serve_service
from bridge.service.sdnotify import Notifier, Watchdog
from bridge.service.taskset import TaskSet
from bridge.transport import InboundMessage, MqttSettings
from bridge.transport.memory import MemoryTransport
from edge_agent import settings as config
from edge_agent.service import EdgeAgent


async def crash(after: asyncio.Event | None = None) -> None:
    if after is not None:
        await after.wait()
    raise RuntimeError("loop fell over")


async def test_a_crash_is_logged_by_name_and_escalated(caplog: pytest.LogCaptureFixture) -> None:
    quiet, loud = TaskSet("router"), TaskSet("agent", escalate=True)
    quiet.spawn(crash(), "handler-1")
    loud.spawn(crash(), "publisher")
    await asyncio.wait_for(loud.failed.wait(), 5)
    await quiet.cancel()
    assert not quiet.failed.is_set() and quiet.crashed is None  # logged only
    assert loud.crashed is not None and loud.crashed[0] == "publisher"
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.exc_info]
    assert (logging.ERROR, "router task handler-1 crashed") in logged
    assert (logging.ERROR, "agent task publisher crashed") in logged


async def test_drain_lets_tasks_finish_within_the_bound_then_cancels_and_never_raises() -> None:
    tasks = TaskSet("t")
    go = asyncio.Event()
    finished: list[str] = []

    async def quick() -> None:
        await go.wait()
        finished.append("quick")

    async def stuck() -> None:
        await asyncio.Event().wait()

    died = tasks.spawn(crash(), "died-earlier")
    quick_task = tasks.spawn(quick(), "quick")
    stuck_task = tasks.spawn(stuck(), "stuck")
    await asyncio.wait([died])  # it dies before the stop
    assert tasks.names() == ["quick", "stuck"]
    go.set()
    cancelled = await tasks.drain(0.2)  # would raise RuntimeError if it re-raised
    assert finished == ["quick"] and not quick_task.cancelled()
    assert cancelled == 1 and stuck_task.cancelled() and len(tasks) == 0


async def test_an_agent_whose_loop_died_still_closes_transport_then_outbox(
        tmp_path: Path) -> None:
    broker = f"tasks-{uuid.uuid4().hex[:8]}"
    settings = config.load(None, {
        "PUDU_CALLBACK_CODE": "c", "MQTT_URL": f"mqtt://{broker}", "MQTT_BACKEND": "memory",
        "ORG_ID": "acme", "GATEWAY_ID": "gw1", "OUTBOX_PATH": str(tmp_path / "outbox.db")})
    presence: list[bytes] = []
    watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{broker}", client_id="watch",
                                                    clean_start=True))

    def seen(message: InboundMessage) -> None:
        presence.append(message.payload)

    watcher.message_handler = seen
    async with watcher:
        await watcher.subscribe("org/acme/device/gw1/presence", qos=1)
        agent = EdgeAgent(settings)
        async with agent:  # leaving it must not raise the loop's RuntimeError
            agent.tasks.spawn(crash(), "doomed-loop")
            await asyncio.wait_for(agent.tasks.failed.wait(), 5)
        assert presence[-1] == b"offline"  # the transport was closed in order
        async with EdgeAgent(settings):  # and the outbox's lock released
            pass


class _Service:
    """A service whose loop crashes once it is serving; records its own exit."""

    def __init__(self) -> None:
        self.tasks = TaskSet("svc", escalate=True)
        self.serving = asyncio.Event()
        self.exited = False

    async def __aenter__(self) -> _Service:
        self.tasks.spawn(crash(self.serving), "ingest-loop")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.tasks.cancel()
        self.exited = True


async def _serve(service: _Service) -> None:
    server = make_server(FastAPI(), "127.0.0.1", 0, NodelayStats())
    notifier = Notifier({})
    await serve_service(service, lambda: [Listener("api", "127.0.0.1", 0, server)],
                        notifier=notifier, watchdog=Watchdog(notifier), status=lambda: "ok",
                        on_ready=service.serving.set, tasks=service.tasks)


async def test_a_crashed_loop_stops_the_service_in_order() -> None:
    service = _Service()
    with pytest.raises(FleetError, match="background task ingest-loop crashed"):
        await asyncio.wait_for(_serve(service), 20)
    assert service.exited


def test_a_crashed_loop_exits_4_so_systemd_restarts_it(capsys: pytest.CaptureFixture[str]) -> None:
    service = _Service()
    assert run_main("svc", _serve(service)) == EXIT_FAILED
    assert "svc: background task ingest-loop crashed" in capsys.readouterr().err
    assert EXIT_FAILED not in (1, 2)  # RestartPreventExitStatus=1 2 in systemd/*.service
