"""Behind a load balancer: trusted X-Forwarded-*, the console cookie and origin check
through a proxy, no framing anywhere, a CSP on the API docs (bridge.http.forwarded)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.errors import ConfigError
from bridge.http.forwarded import ForwardedHeaders, TrustedProxies
from bridge.http.server import NodelayStats, make_server
from callback_server import settings as cb_config
from callback_server.keys import add_key
from callback_server.service import CallbackServer
from tests.support.waiting import eventually_async

PROXY = "10.1.2.3"  # the load balancer, inside FORWARDED_ALLOW_IPS below
STRANGER = "198.51.100.7"  # anyone else on the internet
PUBLIC = "console.example.com"
BEHIND = {"Host": "callback-server.internal:3005", "X-Forwarded-Host": PUBLIC,
          "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9",
          "Origin": f"https://{PUBLIC}"}


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[CallbackServer, str]]:
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "viewer", ["acme"], "viewer")
    settings = cb_config.load(None, {
        "MQTT_URL": f"mqtt://b{uuid.uuid4().hex[:8]}", "MQTT_BACKEND": "memory",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}", "API_KEYS_FILE": str(keys)})
    async with CallbackServer(settings) as server:
        yield server, key


def client(server: CallbackServer, peer: str) -> httpx.AsyncClient:
    app = ForwardedHeaders(server.app, TrustedProxies.parse("10.0.0.0/8, 127.0.0.1"))
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://callback-server.internal")


async def sign_in(c: httpx.AsyncClient, key: str, headers: dict[str, str]) -> httpx.Response:
    return await c.post("/console/session", json={"key": key}, headers=headers)


async def test_through_a_trusted_proxy_the_public_host_and_https_count(tmp_path: Path) -> None:
    async with served(tmp_path) as (server, key), client(server, PROXY) as c:
        answer = await sign_in(c, key, BEHIND)
        assert answer.status_code == 200, answer.text
        cookie = answer.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        # another site's page, through the same proxy: still refused
        evil = await sign_in(c, key, {**BEHIND, "Origin": "https://evil.example"})
        assert evil.status_code == 403


async def test_a_stranger_cannot_claim_to_be_the_proxy(tmp_path: Path) -> None:
    async with served(tmp_path) as (server, key), client(server, STRANGER) as c:
        # X-Forwarded-Host ignored: the Origin is compared with the real Host
        answer = await sign_in(c, key, BEHIND)
        assert answer.status_code == 403 and "Origin of this host" in answer.json()["message"]
        direct = await sign_in(c, key, {"Host": PUBLIC, "Origin": f"http://{PUBLIC}",
                                        "X-Forwarded-Proto": "https"})
        assert direct.status_code == 200
        assert "secure" not in direct.headers["set-cookie"].lower()  # -Proto ignored too


async def test_cookie_is_secure_when_the_browser_is_on_https_whatever_the_hop(
        tmp_path: Path) -> None:
    """A proxy that terminates TLS but is not (yet) trusted: the browser's Origin says https."""
    async with served(tmp_path) as (server, key), client(server, STRANGER) as c:
        answer = await sign_in(c, key, {"Host": PUBLIC, "Origin": f"https://{PUBLIC}"})
        assert answer.status_code == 200
        assert "secure" in answer.headers["set-cookie"].lower()
        out = await c.post("/console/logout", headers={"Host": PUBLIC,
                                                       "Origin": f"https://{PUBLIC}"})
        assert "secure" in out.headers["set-cookie"].lower()


async def test_no_page_may_be_framed_and_the_docs_have_a_csp(tmp_path: Path) -> None:
    async with served(tmp_path) as (server, _), client(server, STRANGER) as c:
        for path in ("/", "/docs", "/redoc", "/callback/health", "/openapi.json", "/nowhere",
                     "/static/docs/swagger-ui.css"):
            answer = await c.get(path)
            assert answer.headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], path
        console = await c.get("/")
        assert "default-src 'self'" in console.headers["content-security-policy"]  # its own
        docs = await c.get("/docs")
    policy = docs.headers["content-security-policy"]
    script_src = re.search(r"script-src ([^;]+)", policy)
    assert script_src and "'unsafe-inline'" not in script_src.group(1)
    inline = re.findall(r"<script>(.*?)</script>", docs.text, re.S)
    assert len(inline) == 1  # Swagger UI's start; allowed by its hash, nothing else inline
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in script_src.group(1)


def test_trusted_proxies_setting() -> None:
    trusted = TrustedProxies.parse("10.0.0.0/8, 192.0.2.1,::1")
    assert "10.200.0.1" in trusted and "192.0.2.1" in trusted and "::1" in trusted
    assert "192.0.2.2" not in trusted and "11.0.0.1" not in trusted and "unix" not in trusted
    assert "203.0.113.1" in TrustedProxies.parse("*")
    assert "127.0.0.1" in TrustedProxies.from_environ({})  # uvicorn's default: loopback
    assert "10.0.0.1" not in TrustedProxies.from_environ({})
    with pytest.raises(ConfigError, match=r"'10\.0\.0\.0/33'"):
        TrustedProxies.parse("10.0.0.0/8,10.0.0.0/33")


async def test_a_real_listener_believes_loopback_by_default_and_refuses_framing() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append({"scheme": scope["scheme"], "client": scope["client"][0],
                     "host": dict(scope["headers"])[b"host"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server = make_server(app, "127.0.0.1", 0, NodelayStats())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="listener")
    try:
        async with httpx.AsyncClient() as c:
            answer = await eventually_async(  # the listener's startup
                lambda: c.get(f"http://127.0.0.1:{sock.getsockname()[1]}/",
                              headers={"X-Forwarded-Proto": "https",
                                       "X-Forwarded-For": "203.0.113.9",
                                       "X-Forwarded-Host": PUBLIC}),
                accept=lambda _: True, ignoring=(httpx.TransportError,), within=5,
                what="the listener answering")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()
    assert answer.headers["x-frame-options"] == "DENY"
    assert seen == [{"scheme": "https", "client": "203.0.113.9", "host": PUBLIC.encode()}]


def test_a_bad_forwarded_allow_ips_stops_the_service_with_one_line(tmp_path: Path) -> None:
    env = {"FORWARDED_ALLOW_IPS": "10.0.0.0/8,lb.internal",
           "MQTT_URL": "mqtt://127.0.0.1:1883", "TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'cb.db'}", "CALLBACK_HTTP_PORT": "0",
           "CALLBACK_HTTP_HOST": "127.0.0.1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "callback_server", "run"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "FORWARDED_ALLOW_IPS" in ln]
    assert len(lines) == 1 and "'lb.internal' is not an address" in lines[0], done.stderr


@pytest.mark.integration
def test_docs_render_in_a_browser_under_their_csp(tmp_path: Path) -> None:
    """Debian's chromium: Swagger UI and ReDoc draw the API with nothing refused."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.support.services import callback_server

    chromium, chromedriver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and chromedriver.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    with callback_server(tmp_path, "mqtt://127.0.0.1:1883", db,
                         TOPIC_PREFIX=f"t{uuid.uuid4().hex[:8]}") as cs:
        driver = webdriver.Chrome(service=Service(executable_path=str(chromedriver)),
                                  options=options)
        try:
            driver.get(cs.url + "/docs")
            WebDriverWait(driver, 30).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 5)
            driver.get(cs.url + "/redoc")
            WebDriverWait(driver, 30).until(
                lambda d: "/callback/messages" in d.find_element(By.TAG_NAME, "body").text)
            logs = driver.get_log("browser")  # type: ignore[no-untyped-call]
        finally:
            driver.quit()
    refused = [entry["message"] for entry in logs
               if "Content Security Policy" in entry["message"] or "Refused" in entry["message"]]
    # What the policy is for: ReDoc's footer logo from its CDN is not fetched (an offline
    # gateway, and no third party learns who reads the docs). Nothing of the page's own.
    own = [m for m in refused if not re.search(r"Loading the image 'https://cdn\.redoc", m)]
    assert not own, own
