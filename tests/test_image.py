"""The container image (Containerfile), run as an orchestrator would run it.

``make image-test`` builds the image from a local Debian base and runs this module with
``PUDU_IMAGE`` naming it; without it (plain ``make test``) every test here is skipped.
Containers run with ``buildah run --isolation chroot --network host`` (no Docker engine
and no OCI runtime that works in this sandbox), as the image's own user, against the
machine's Mosquitto and MariaDB. buildah itself answers SIGTERM by killing its child, so
the stop signal goes to the service process inside, as a container engine sends it to the
container's main process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from bridge.envelope import Envelope
from tests.support import pins
from tests.support.dbutil import query, scratch_mysql_database
from tests.support.mqtt_probe import Probe, publish_once
from tests.support.procs import MosquittoProcess, free_port
from tests.support.waiting import NotYet, eventually

IMAGE = os.environ.get("PUDU_IMAGE", "")
BROKER = "mqtt://127.0.0.1:1883"
UID = 10001
#: ECS's default stopTimeout; Kubernetes' terminationGracePeriodSeconds is 30 too.
STOP_BUDGET = 30.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not IMAGE, reason="needs PUDU_IMAGE (make image-test builds it)"),
    pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah"),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah run --isolation chroot needs root"),
]

#: What buildah itself adds on stderr when the command inside fails; not the service's.
_BUILDAH_NOISE = ("subprocess exited", "Error: exit status")


def buildah(*args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, check=check,
                          timeout=timeout)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise LookupError(pid)


class Container:
    """A working container of the image and one command run in it (``buildah run``)."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log: Path, *,
                 volumes: Mapping[Path, str] | None = None) -> None:
        self.name = f"pudu-test-{uuid.uuid4().hex[:8]}"
        self.command = list(command)
        self.env = dict(env)
        self.volumes = dict(volumes or {})
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        buildah("from", "--name", self.name, "--pull-never", IMAGE)

    def _run_args(self, command: Sequence[str], env: Mapping[str, str] | None = None
                  ) -> list[str]:
        args = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for key, value in {**self.env, **(env or {})}.items():
            args += ["-e", f"{key}={value}"]
        for host, inside in self.volumes.items():
            args += ["-v", f"{host}:{inside}"]
        return [*args, self.name, "--", *command]

    def start(self) -> Container:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self._run_args(self.command), stdout=out, stderr=out)
        return self

    def exec(self, *command: str, env: Mapping[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Another command in the same container (a health check, check-config)."""
        return subprocess.run(self._run_args(command, env), capture_output=True, text=True,
                              timeout=timeout)

    def service_pid(self, timeout: float = 20) -> int:
        """The service's own process (what a container engine signals as PID 1)."""
        proc = self.proc
        assert proc is not None

        def python_child() -> int | None:  # the tree appears as buildah sets up the chroot
            stack, seen = [proc.pid], []
            while stack:
                pid = stack.pop()
                kids = _children(pid)
                stack += kids
                seen += kids
            for pid in seen:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if any(part.endswith(b"/bin/python") for part in cmd):
                    return pid
            if proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited: {self.output()}")
            return None

        try:
            found = eventually(python_child, within=timeout, every=0.05,
                               what="the service process under buildah run")
        except NotYet as exc:
            raise NotYet(f"{exc}: {self.output()}") from None
        assert found is not None
        return found

    def wait_http(self, url: str, timeout: float = 60) -> None:
        """Until ``url`` answers 200 (the service's readiness, as a load balancer sees it)."""
        proc = self.proc
        assert proc is not None
        with httpx.Client(timeout=2) as client:

            def ready() -> bool:  # polling health is the readiness event
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.command} exited: {self.output()}")
                return client.get(url).status_code == 200

            try:
                eventually(ready, within=timeout, every=0.1, what=f"{url} ready",
                           ignoring=(httpx.TransportError,))
            except NotYet as exc:
                raise NotYet(f"{exc}: {self.output()}") from None

    def terminate(self, timeout: float = STOP_BUDGET) -> tuple[int, float]:
        """SIGTERM to the service; its exit code (through buildah run) and how long it took."""
        assert self.proc is not None
        pid = self.service_pid()
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"not stopped within {timeout} s: {self.output()}") from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(LookupError, TimeoutError, RuntimeError, ProcessLookupError):
                os.kill(self.service_pid(timeout=2), signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)

    def output(self, tail: int = 3000) -> str:
        """The container's stdout and stderr (the last ``tail`` characters; 0: all)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-tail:] if tail else text

    def remove(self) -> None:
        self.kill()
        buildah("rm", self.name, check=False)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


def envelope(org: str, sn: str, i: int, channel: str = "power") -> dict[str, Any]:
    env = Envelope(id=f"img-{i}-{sn}", type="notifyRobotPower", org=org, device=sn,
                   gateway="gw", ts=1700000000 + i, received_at=1700000001 + i,
                   data={"battery_level": i}, raw={"power": i}, channel=channel)
    return json.loads(env.to_json())  # type: ignore[no-any-return]


def callback_env(database_url: str, prefix: str, port: int, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "MQTT_URL": BROKER, "TOPIC_PREFIX": prefix,
            "CALLBACK_HTTP_PORT": str(port), "CALLBACK_TOKEN": "rule-token",
            # host network: the host name is the machine's, so each replica names itself
            "MQTT_CLIENT_ID": f"cs-{prefix}-{port}", **extra}


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def mysql_db(mariadb_url: str) -> Iterator[str]:
    with scratch_mysql_database() as url:
        yield url


def stored_ids(db: str) -> set[str]:
    return {r["id"] for r in query(db, "SELECT id FROM mqtt_message_log")}


def wait_rows(db: str, ids: set[str], timeout: float = 30) -> None:
    eventually(lambda: sorted(ids - stored_ids(db)), accept=lambda missing: not missing,
               within=timeout, every=0.1, what="every id stored")  # the database: observable


# --- the image as built ----------------------------------------------------------------

def test_image_config_states_user_ports_health_check_and_stop_signal() -> None:
    info = json.loads(buildah("inspect", "--type", "image", IMAGE).stdout)
    config = info["Docker"]["config"]
    assert config["User"] == f"{UID}:{UID}"
    assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "3005/tcp"}
    assert config["StopSignal"] == "SIGTERM"
    assert "/var/lib/edge-agent" in config["Volumes"]
    assert config["Cmd"] == ["callback-server", "run"] and not config.get("Entrypoint")
    # kept only in Docker's format (buildah bud --format docker): OCI has no HEALTHCHECK
    check = config["Healthcheck"]
    assert "callback-server probe" in " ".join(check["Test"])
    assert "edge-agent probe" in " ".join(check["Test"])
    assert check["Interval"] == 30 * 10**9


def test_final_image_holds_no_compiler_pip_cache_or_tests() -> None:
    """Listed from the image's own root filesystem."""
    name = f"pudu-test-{uuid.uuid4().hex[:8]}"
    buildah("from", "--name", name, "--pull-never", IMAGE)
    try:
        root = Path(buildah("mount", name).stdout.strip())
        files = [p.relative_to(root) for p in root.rglob("*")
                 if not str(p.relative_to(root)).startswith(("proc/", "sys/", "dev/"))]
        bins = {p.name for p in files if p.parent.name in ("bin", "sbin")}
        compilers = {"gcc", "cc", "c++", "g++", "clang", "cpp", "as", "ld", "make", "cc1"}
        assert not bins & compilers, sorted(bins & compilers)
        assert not [p for p in bins if p.startswith(("gcc-", "x86_64-linux-gnu-"))]
        assert not (root / "usr/lib/gcc").exists()  # where cc1 and the linker plugins live
        venv = Path("opt/pudu-fleet-bridge")
        site = venv / "lib/python3.11/site-packages"
        assert (root / site / "bridge").is_dir() and (root / venv / "bin/callback-server").exists()
        # every dependency at the version the suite passed with (constraints.txt)
        held = pins.in_paths(str(p) for p in files if p.is_relative_to(site))
        # the default extras: aws (boto3) and awsiot (awscrt, what deploy/ runs on)
        assert {"boto3", "awscrt", "awsiotsdk"} <= set(held), sorted(held)
        assert pins.off_pin(held) == {}
        # no pip (installed into by the build stage's pip), no pip cache anywhere
        assert not (root / site / "pip").exists() and not (root / venv / "bin/pip").exists()
        assert not [p for p in files if p.parts[-2:] == (".cache", "pip")]
        assert not [p for p in files if p.suffix == ".whl" and "python-wheels" not in p.parts]
        # none of the project's tests, test data or build context
        ours = {p.name for p in (Path(__file__).parent).glob("*.py")} - {"__init__.py"}
        leaked = [p for p in files if p.name in ours or p.name == "conftest.py"
                  or p.parts[:1] == ("src",) or "pudu_fleet_bridge" in p.parts[:1]]
        assert not leaked, leaked
        for package in ("bridge", "edge_agent", "callback_server"):
            assert not [p for p in (root / site / package).rglob("test*")], package
        # what the build stage lent it stays there
        assert not (root / "run/secrets/pipcert").exists()
        assert not (root / "wheels").exists() and not (root / "opt/build-tools").exists()
    finally:
        buildah("umount", name, check=False)
        buildah("rm", name, check=False)


def test_check_config_with_a_bad_setting_exits_1_with_one_line(tmp_path: Path) -> None:
    with Container([], {}, tmp_path / "c.log") as ctr:
        bad = ctr.exec("callback-server", "check-config", env={"CALLBACK_HTTP_PORT": "99999"})
        ok = ctr.exec("edge-agent", "check-config")  # PUDU_CALLBACK_CODE is required
    lines = [ln for ln in bad.stderr.splitlines() if not ln.startswith(_BUILDAH_NOISE)]
    assert bad.returncode == 1, bad.stderr
    assert len(lines) == 1 and "http_port" in lines[0] and "CALLBACK_HTTP_PORT" in lines[0], lines
    assert bad.stdout == ""
    edge_lines = [ln for ln in ok.stderr.splitlines() if not ln.startswith(_BUILDAH_NOISE)]
    assert ok.returncode == 1 and len(edge_lines) == 1 and "pudu_callback_code" in edge_lines[0]


def test_the_awsiot_backend_deploy_names_loads_in_the_image(tmp_path: Path) -> None:
    """deploy/kubernetes runs MQTT_BACKEND=awsiot: the image has its extra, so what
    check-config asks for is the certificate, not a package."""
    env = {"MQTT_BACKEND": "awsiot", "DATABASE_URL": "sqlite:////tmp/cb.db",
           "MQTT_URL": "mqtts://a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883"}
    with Container([], {}, tmp_path / "c.log") as ctr:
        checked = ctr.exec("callback-server", "check-config", env=env)
    assert "extra" not in checked.stderr, checked.stderr
    assert "client certificate" in checked.stderr, checked.stderr


# --- the services in the image ----------------------------------------------------------

def test_callback_server_stores_http_and_mqtt_and_stops_on_sigterm(
        tmp_path: Path, mysql_db: str, prefix: str) -> None:
    port = free_port()
    health = f"http://127.0.0.1:{port}/callback/health"
    with Container(["callback-server", "run"], callback_env(mysql_db, prefix, port),
                   tmp_path / "cs.log") as ctr:
        ctr.start().wait_http(f"{health}?ready=1")
        assert _uid(ctr.service_pid()) == UID  # the image's user, nothing asked of buildah
        pushed = httpx.post(f"http://127.0.0.1:{port}/callback/messages",
                            json=envelope("acme", "R1", 1),
                            headers={"X-Callback-Token": "rule-token"}, timeout=10)
        assert pushed.status_code == 200, pushed.text
        publish_once(BROKER, f"{prefix}/org/acme/device/R2/power",
                     json.dumps(envelope("acme", "R2", 2)))
        wait_rows(mysql_db, {"img-1-R1", "img-2-R2"})
        probe = ctr.exec("callback-server", "probe")  # the HEALTHCHECK's command
        assert probe.returncode == 0, probe.stderr
        code, took = ctr.terminate()
        logs = ctr.output(tail=0)
    assert code == 0 and took < STOP_BUDGET, (code, took, logs)
    print(f"callback server: SIGTERM to exit {took:.1f} s")
    # the existing JSON lines, on the container's stdout/stderr
    lines = [json.loads(ln) for ln in logs.splitlines() if ln.startswith("{")]
    assert any("listening" in ln["msg"] for ln in lines)
    robots = {r["robot_sn"]: r for r in query(mysql_db, "SELECT * FROM mnt_robots_management")}
    assert robots["R1"]["battery_level"] == 1 and robots["R2"]["battery_level"] == 2


def test_probe_fails_when_nothing_answers(tmp_path: Path) -> None:
    with Container([], {}, tmp_path / "c.log") as ctr:
        down = ctr.exec("callback-server", "probe", env={"CALLBACK_HTTP_PORT": str(free_port())})
        edge = ctr.exec("edge-agent", "probe", env={"PUDU_CALLBACK_CODE": "x",
                                                    "EDGE_HTTP_PORT": str(free_port())})
    assert down.returncode == 1 and "refused" in down.stderr, down.stderr
    assert edge.returncode == 1 and "/api/pudu/webhook/health?ready=1" in edge.stderr


def test_edge_agent_publishes_and_a_sigterm_backlog_is_delivered_after_restart(
        tmp_path: Path, prefix: str) -> None:
    """Broker away: webhooks answered 200 pile up in the outbox on the volume; SIGTERM
    exits 0 in time; a new container on the same volume delivers every one."""
    volume = tmp_path / "edge-state"
    volume.mkdir()
    os.chown(volume, UID, UID)
    broker = MosquittoProcess(tmp_path / "broker").start()
    port = free_port()
    env = {"PUDU_CALLBACK_CODE": "site-code", "MQTT_URL": broker.url, "ORG_ID": "acme",
           "GATEWAY_ID": f"gw-{prefix}", "TOPIC_PREFIX": prefix, "EDGE_HTTP_PORT": str(port),
           "EDGE_ADMIN_PORT": str(free_port()), "MQTT_RECONNECT_MAX_SECONDS": "1"}
    url = f"http://127.0.0.1:{port}"
    health = f"{url}/api/pudu/webhook/health"
    topics = f"{prefix}/org/acme/device/+/status"

    def webhook(sn: str, i: int) -> None:
        body = {"callback_type": "notifyRobotStatus",
                "data": {"sn": sn, "run_state": "IDLE", "timestamp": 1700000000 + i}}
        r = httpx.post(f"{url}/api/pudu/webhook", json=body,
                       headers={"CallbackCode": "site-code"}, timeout=10)
        assert r.status_code == 200, r.text

    try:
        with Probe(broker.url, topics) as seen, \
                Container(["edge-agent", "run"], env, tmp_path / "edge1.log",
                          volumes={volume: "/var/lib/edge-agent"}) as first:
            first.start().wait_http(health)
            webhook("LIVE1", 0)
            assert json.loads(seen.wait_for(1)[0].payload)["device"] == "LIVE1"
            broker.stop()
            for i in range(1, 21):
                webhook(f"BACK{i}", i)
            depth = httpx.get(health, timeout=5).json()["outbox_depth"]
            assert depth == 20  # a backlog at SIGTERM: the broker is away
            code, took = first.terminate()
        assert code == 0 and took < STOP_BUDGET, (code, took, first.output())
        print(f"edge agent with a backlog of {depth}: SIGTERM to exit {took:.1f} s")
        assert (volume / "outbox.db").exists()
        broker.start()
        with Probe(broker.url, topics) as seen, \
                Container(["edge-agent", "run"], env, tmp_path / "edge2.log",
                          volumes={volume: "/var/lib/edge-agent"}) as second:
            second.start()
            got = seen.wait_for(20, timeout=60)
            devices = {json.loads(m.payload)["device"] for m in got}
            assert {f"BACK{i}" for i in range(1, 21)} <= devices, second.output()
            second.terminate()
    finally:
        broker.stop()


def test_two_callback_servers_share_the_subscription_and_both_store(
        tmp_path: Path, mysql_db: str, prefix: str) -> None:
    """Started at once against a fresh database: both migrate the schema without a fault."""
    group = f"g{prefix}"
    ports = [free_port(), free_port()]
    replicas = [Container(["callback-server", "run"],
                          callback_env(mysql_db, prefix, port, SHARE_GROUP=group),
                          tmp_path / f"cs{n}.log") for n, port in enumerate(ports)]
    try:
        for ctr in replicas:
            ctr.start()  # both start before either is ready
        for ctr, port in zip(replicas, ports, strict=True):
            ctr.wait_http(f"http://127.0.0.1:{port}/callback/health?ready=1")
        ids = set()
        for i in range(60):
            body = envelope("acme", f"S{i % 6}", i)
            ids.add(body["id"])
            publish_once(BROKER, f"{prefix}/org/acme/device/{body['device']}/power",
                         json.dumps(body))
        wait_rows(mysql_db, ids)
        # the figures are in the detailed body, which needs a key (CALLBACK_TOKEN is one)
        key = {"Authorization": "Bearer rule-token"}
        stored = [httpx.get(f"http://127.0.0.1:{p}/callback/health", headers=key,
                            timeout=5).json()["stored"] for p in ports]
        assert sum(stored) == len(ids) and min(stored) > 0, stored
        for ctr in replicas:
            code, took = ctr.terminate()
            assert code == 0 and took < STOP_BUDGET
    finally:
        for ctr in replicas:
            ctr.remove()


def test_callback_server_takes_a_pudu_webhook_directly_and_stores_it(
        tmp_path: Path, mysql_db: str, prefix: str) -> None:
    """The replaced system's shape: Pudu -> load balancer -> callback server, no gateway."""
    port = free_port()
    env = callback_env(mysql_db, prefix, port, CALLBACK_CODES="site-a=acme,site-b=beta")
    url = f"http://127.0.0.1:{port}"
    with Container(["callback-server", "run"], env, tmp_path / "cs.log") as ctr:
        ctr.start().wait_http(f"{url}/callback/health?ready=1")
        body = {"callback_type": "notifyRobotStatus",
                "data": {"sn": f"PUDU{prefix}", "run_state": "ONLINE", "timestamp": 1700000100}}
        answer = httpx.post(f"{url}/api/pudu/webhook", json=body,
                            headers={"CallbackCode": "site-a"}, timeout=10)
        assert answer.status_code == 200, answer.text
        wrong = httpx.post(f"{url}/api/pudu/webhook", json=body,
                           headers={"CallbackCode": "nope"}, timeout=10)
        assert wrong.status_code == 401
        ctr.terminate()
    rows = query(mysql_db, "SELECT robot_sn, status FROM mnt_robots_management "
                           "WHERE robot_sn = ?", (f"PUDU{prefix}",))
    assert rows and rows[0]["status"] == "online", rows


def test_health_answers_a_load_balancer_ready_and_strict(tmp_path: Path, prefix: str) -> None:
    """Broker away: ready (the outbox/store holds), not strictly healthy; database away:
    not ready, and the HEALTHCHECK's probe says so."""
    from tests.support.mariadb_proc import MariadbProcess

    database = MariadbProcess(tmp_path / "db").start()
    port = free_port()
    env = {**callback_env(database.url, prefix, port), "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}"}
    health = f"http://127.0.0.1:{port}/callback/health"
    try:
        with Container(["callback-server", "run"], env, tmp_path / "cs.log") as ctr:
            ctr.start().wait_http(f"{health}?ready=1")
            strict = httpx.get(f"{health}?strict=1", timeout=5)
            assert strict.status_code == 503
            assert ctr.exec("callback-server", "probe").returncode == 0
            database.stop()
            eventually(lambda: httpx.get(f"{health}?ready=1", timeout=5).status_code == 503,
                       within=30, every=0.2,  # the service notices on its own schedule
                       what="not ready with the database stopped")
            probe = ctr.exec("callback-server", "probe")
            assert probe.returncode == 1 and "503" in probe.stderr, probe.stderr
            body = httpx.get(health, timeout=5).text
            assert str(database.port) not in body and "127.0.0.1" not in body
            code, took = ctr.terminate()
            assert code == 0 and took < STOP_BUDGET, ctr.output()
    finally:
        database.stop()


def test_the_oci_format_would_drop_the_health_check() -> None:
    """Why `make image` builds with --format docker: the same image committed in OCI's
    format has no HEALTHCHECK (OCI's image config has no such field)."""
    name = f"pudu-test-{uuid.uuid4().hex[:8]}"
    buildah("from", "--name", name, "--pull-never", IMAGE)
    try:
        oci = buildah("commit", "--format", "oci", name, f"localhost/{name}:oci")
        assert oci.returncode == 0
        info = json.loads(buildah("inspect", "--type", "image", f"localhost/{name}:oci").stdout)
        assert "Healthcheck" not in info["OCIv1"]["config"]
        assert not info["Docker"]["config"].get("Healthcheck")
    finally:
        buildah("rm", name, check=False)
        buildah("rmi", f"localhost/{name}:oci", check=False)
