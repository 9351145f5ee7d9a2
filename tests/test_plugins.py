"""Plug-in commands on the gateway: an installed package (entry point) and the config."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from bridge import FleetClient
from bridge.commands import Command, CommandExecutor, Response
from bridge.errors import ConfigError
from bridge.topic import TopicScheme
from bridge.transport import InboundMessage
from edge_agent.builtin_commands import BUILTIN_NAMES
from edge_agent.plugins import ENTRY_POINT_GROUP, Plugin, _guarded, problems, register_plugins
from edge_agent.settings import load
from tests.support.services import ADMIN_TOKEN, callback_server, edge_agent
from tests.test_commands import wait_gateways

BROKER = "mqtt://127.0.0.1:1883"

SITE_TOOLS = '''
import asyncio
import sys
import time

async def restart(args):
    return {"restarted": args.get("app", "all")}

async def boom(args):
    raise RuntimeError("disk on fire")

async def slow(args):
    await asyncio.sleep(60)

async def leave(args):
    sys.exit(3)

def blocking(args):
    return "never on the event loop"

async def cancelled(args):
    other = asyncio.ensure_future(asyncio.sleep(60))
    other.cancel()
    await other  # its CancelledError is not the agent's

async def hog(args):
    time.sleep(0.3)  # a blocking call inside an async def: no timeout can interrupt it
    return "late"
'''


def build_wheel(tmp: Path, dist: str, entry_points: dict[str, str], source: str) -> Path:
    """A minimal wheel (PEP 427) of one module ``dist`` with ``entry_points`` in our group."""
    version = "0.1.0"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[{ENTRY_POINT_GROUP}]\n" + "".join(
            f"{name} = {target}\n" for name, target in entry_points.items()),
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    wheel = tmp / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def install(wheel: Path, target: Path) -> Path:
    """``pip install --target``: the package lands as it would in a site-packages."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    return target


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with ``site_tools.py`` (config plug-ins, not a package)."""
    path = tmp_path / "site"
    path.mkdir()
    (path / "site_tools.py").write_text(SITE_TOOLS)
    return path


# -- in process -----------------------------------------------------------------------------
def test_problems_name_each_unusable_plugin(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(site))
    settings = load(None, {"PUDU_CALLBACK_CODE": "c", "COMMAND_PLUGINS": (
        "ok=site_tools:restart,get_status=site_tools:restart,sync=site_tools:blocking,"
        "gone=site_tools:missing,nomod=no_such_module_x:f")})
    found = problems(settings, BUILTIN_NAMES)
    assert len(found) == 4, found
    assert any("'get_status'" in p and "shadow the built-in" in p for p in found)
    assert any("'sync'" in p and "not an async function" in p for p in found)
    assert any("'gone'" in p and "cannot load" in p for p in found)
    assert any("'nomod'" in p and "ModuleNotFoundError" in p for p in found)
    with pytest.raises(ConfigError, match="shadow the built-in"):
        register_plugins(None, settings, BUILTIN_NAMES)  # type: ignore[arg-type]


def test_command_plugins_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="module:function"):
        load(None, {"PUDU_CALLBACK_CODE": "c", "COMMAND_PLUGINS": "x=not-a-target"})
    with pytest.raises(ConfigError, match="name=module:function"):
        load(None, {"PUDU_CALLBACK_CODE": "c", "COMMAND_PLUGINS": "justaname"})


async def test_guard_turns_exit_and_slowness_into_errors(site: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(site))
    import site_tools  # type: ignore[import-not-found]

    slow = _guarded(Plugin("slow", "site_tools:slow", "test"), site_tools.slow, 0.05)
    with pytest.raises(TimeoutError, match=r"did not answer within 0\.05 s"):
        await slow({})
    leave = _guarded(Plugin("leave", "site_tools:leave", "test"), site_tools.leave, 1)
    with pytest.raises(RuntimeError, match="tried to exit"):
        await leave({})


class Recorder:
    """A transport that keeps what the executor publishes (its command answers)."""

    max_payload = 268_435_455

    def __init__(self) -> None:
        self.sent: list[Response] = []

    def check_publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Takes anything (an answer's size is checked against it since issue 24)."""

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.sent.append(Response.from_json(payload))


async def test_plugins_from_the_yaml_file_answer_even_when_cancelled_inside(
        tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(site))
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("pudu_callback_code: c\n"
                   "command_plugins: {restart_app: 'site_tools:restart',"
                   " cancelled: 'site_tools:cancelled'}\n")
    settings = load(str(cfg), {})
    assert settings.command_plugins == {"restart_app": "site_tools:restart",
                                        "cancelled": "site_tools:cancelled"}
    recorder = Recorder()
    executor = CommandExecutor(recorder, TopicScheme("acme"), "gw")  # type: ignore[arg-type]
    assert sorted(register_plugins(executor, settings, BUILTIN_NAMES)) == [
        "cancelled", "restart_app"]
    restart, cancelled = Command("restart_app", {"app": "kiosk"}), Command("cancelled", {})
    for command in (restart, cancelled):
        executor.on_message(InboundMessage(executor.command_topic, command.to_json(), 1))
    await executor.aclose()  # lets running commands answer first
    answers = {r.message_id: r for r in recorder.sent}
    assert answers[restart.message_id].result == {"restarted": "kiosk"}
    assert answers[cancelled.message_id].status == "error"
    assert "cancelled" in (answers[cancelled.message_id].error or "")


async def test_a_plugin_that_blocks_past_its_timeout_is_logged(
        site: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(site))
    import site_tools

    hog = _guarded(Plugin("hog", "site_tools:hog", "test"), site_tools.hog, 0.05)
    assert await hog({}) == "late"  # the timeout could not fire: the loop was blocked
    assert any("'hog'" in r.getMessage() and "blocks the event loop" in r.getMessage()
               and "asyncio.to_thread" in r.getMessage() for r in caplog.records)


# -- a running agent ------------------------------------------------------------------------
@pytest.mark.integration
async def test_installed_and_configured_plugins_answer(tmp_path: Path, site: Path) -> None:
    wheel = build_wheel(tmp_path, "pudu_site_hello", {"hello": "pudu_site_hello:hello"},
                        textwrap.dedent('''
                            async def hello(args):
                                return {"hello": args.get("name", "world")}
                        '''))
    target = install(wheel, tmp_path / "plugins")
    assert (target / "pudu_site_hello-0.1.0.dist-info" / "entry_points.txt").is_file()
    p = f"t{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with callback_server(tmp_path, BROKER, db, TOPIC_PREFIX=p) as server, \
            edge_agent(tmp_path, BROKER, org="acme", gateway="gwp", TOPIC_PREFIX=p,
                       PYTHONPATH=f"{target}{os.pathsep}{site}",
                       COMMAND_PLUGINS="restart_app=site_tools:restart, boom=site_tools:boom,"
                                       "slow=site_tools:slow,leave=site_tools:leave",
                       COMMAND_PLUGIN_TIMEOUT_SECONDS="0.5") as agent:
        wait_gateways(server, {"gwp": "online"})
        async with FleetClient(server.url, ADMIN_TOKEN) as client:
            hello, restart, boom, slow, leave = await asyncio.gather(
                client.send_command("gwp", "hello", {"name": "site"}),
                client.send_command("gwp", "restart_app", {"app": "kiosk"}),
                client.send_command("gwp", "boom"),
                client.send_command("gwp", "slow"),
                client.send_command("gwp", "leave"))
            status = await client.send_command("gwp", "get_status")
        alive = agent.proc is not None and agent.proc.poll() is None
    assert (hello.status, hello.result) == ("success", {"hello": "site"})
    assert (restart.status, restart.result) == ("success", {"restarted": "kiosk"})
    assert (boom.status, boom.error) == ("error", "disk on fire")
    assert slow.status == "error" and "did not answer within 0.5 s" in (slow.error or "")
    assert leave.status == "error" and "tried to exit" in (leave.error or "")
    assert status.status == "success" and alive  # the agent answered after all of them
    assert {"hello", "restart_app", "boom", "ping", "pudu.recharge"} <= set(
        status.result["commands"])


def _agent_cli(tmp: Path, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PUDU_CALLBACK_CODE": "c", "OUTBOX_PATH": str(tmp / "o.db"),
            "MQTT_URL": BROKER, "EDGE_HTTP_PORT": "0", "EDGE_ADMIN_PORT": "0", **env}
    return subprocess.run([sys.executable, "-m", "edge_agent", command], env=full,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_plugin_named_like_a_builtin_is_refused_at_start(tmp_path: Path, site: Path) -> None:
    wheel = build_wheel(tmp_path, "pudu_site_ping", {"ping": "pudu_site_ping:ping"},
                        "async def ping(args):\n    return 'mine'\n")
    target = install(wheel, tmp_path / "plugins")
    started = time.monotonic()
    by_package = _agent_cli(tmp_path, "run", PYTHONPATH=str(target))
    by_config = _agent_cli(tmp_path, "run", PYTHONPATH=str(site),
                           COMMAND_PLUGINS="get_status=site_tools:restart")
    checked = _agent_cli(tmp_path, "check-config", PYTHONPATH=str(site),
                         COMMAND_PLUGINS="get_status=site_tools:restart")
    assert time.monotonic() - started < 60
    assert by_package.returncode == 1, by_package.stderr
    assert ("command plug-in 'ping' (entry point of pudu_site_ping, pudu_site_ping:ping) "
            "would shadow the built-in command of that name") in by_package.stderr
    assert by_config.returncode == 1
    assert "'get_status' (command_plugins, site_tools:restart) would shadow" in by_config.stderr
    assert checked.returncode == 1 and "would shadow" in checked.stderr
