"""Outbound webhooks go only where allowed: refused at subscribe and at every delivery.

Traffic stays on loopback: every other address class is shown refused by the refusal
itself (no HTTP client is even made), and a guard fails the test if anything tries to
connect anywhere but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.errors import ConfigError, OutboundRefusedError
from bridge.http.error_boundary import status_for
from bridge.http.outbound import OutboundPolicy, client, parse_allow, system_resolver
from bridge.proxy import MqttProxy, RetryPolicy
from bridge.router import MessageRouter
from callback_server.settings import load as load_callback_settings
from edge_agent.settings import load as load_edge_settings
from tests.test_proxy import PahoClient, running_proxy, serve

pytestmark = pytest.mark.integration

#: Not one of these is ever connected to: each is refused before any connection exists.
REFUSED_HOSTS = [
    "127.0.0.1", "localhost", "0.0.0.0", "[::1]", "2130706433", "127.1", "0x7f000001",
    "169.254.169.254", "[fe80::1]", "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]",
    "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1", "[fd00::1]", "[::]",
    "224.0.0.1", "240.0.0.1",
    # IPv6 forms of IPv4 addresses that Python 3.11 calls global: IPv4-compatible
    # loopback, SIIT, NAT64 of the metadata service and of loopback, 6to4 of loopback.
    "[::7f00:1]", "[::127.0.0.1]", "[::ffff:0:7f00:1]", "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b::7f00:1]", "[2002:7f00:1::1]",
]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail any connection attempt to an address other than 127.0.0.1."""
    elsewhere: list[str] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def guarded(self: httpcore.AnyIOBackend, host: str, port: int,
                      *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        if host != "127.0.0.1":
            elsewhere.append(host)
            raise AssertionError(f"the test tried to connect to {host}")
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", guarded)
    yield elsewhere
    assert elsewhere == []


#: Names the system resolver answers from /etc/hosts or inet_aton, without any DNS query.
LOCAL_NAMES = {"localhost", "2130706433", "127.1", "0x7f000001"}


class Resolver:
    """A DNS the test controls: ``answers[name]`` is what ``name`` resolves to right now.

    The names of LOCAL_NAMES go to the real system resolver; every other is unknown.
    """

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if host in LOCAL_NAMES:
            return await system_resolver(host, port)
        if host not in self.answers:
            raise OSError(f"{host}: no such name")
        return self.answers[host]


@dataclass
class Env:
    base: str
    router: MessageRouter
    proxy: MqttProxy
    client: httpx.AsyncClient
    resolver: Resolver


@contextlib.asynccontextmanager
async def proxy_env(allow: Sequence[str] = ()) -> AsyncIterator[Env]:
    resolver = Resolver()
    async with running_proxy("out", retry=RetryPolicy(attempts=2, base=0.05, cap=0.1),
                             outbound=OutboundPolicy(allow=tuple(allow),
                                                     resolver=resolver)) as running:
        yield Env(running.base, running.router, running.proxy, running.client, resolver)


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, asyncio.Queue[Request]]]:
    """A webhook receiver on 127.0.0.1; yields (its base URL, the requests it got)."""
    got: asyncio.Queue[Request] = asyncio.Queue()

    async def hook(request: Request) -> Response:
        await request.body()
        await got.put(request)
        return Response(status_code=204)

    async with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as url:
        yield url, got


async def test_every_non_global_address_class_is_refused_at_subscribe() -> None:
    async with proxy_env() as env, receiver() as (url, _):
        own_port = url.rsplit(":", 1)[1]
        # The server itself, by the address it listens on, is one more of them.
        for host in [*REFUSED_HOSTS, f"127.0.0.1:{own_port}"]:
            r = await env.client.post("/mqtt/subscribe", json={
                "topic": env.base + "x", "callback_url": f"http://{host}/hook"})
            assert r.status_code == 422, (host, r.text)
            detail = error_of(r)
            assert detail["field"] == "callback_url"
            assert "globally routable" in detail["message"], detail
            assert "CALLBACK_URL_ALLOW" in detail["message"]
        assert env.proxy.subscriptions() == []
        assert env.proxy._http is None  # refused before a client was even made
        # Only the names went to the resolver; literal addresses are judged as written.
        assert set(env.resolver.asked) == LOCAL_NAMES


async def test_a_name_resolving_to_loopback_is_refused_at_subscribe_and_unknown_names_too(
) -> None:
    async with proxy_env() as env:
        env.resolver.answers["hooks.example.com"] = ["203.0.113.7", "127.0.0.1"]
        messages: list[str] = []
        for host in ("hooks.example.com", "nowhere.example.com"):
            r = await env.client.post("/mqtt/subscribe", json={
                "topic": env.base + "x", "callback_url": f"https://{host}/hook"})
            assert r.status_code == 422 and error_of(r)["field"] == "callback_url"
            assert "127.0.0.1" not in r.text  # the address is not told: no DNS oracle
            messages.append(error_of(r)["message"].replace(host, "HOST"))
        # Nor whether the name exists inside: unknown and internal read the same.
        assert messages[0] == messages[1], messages


async def test_a_name_that_resolves_to_loopback_later_is_refused_at_delivery() -> None:
    async with proxy_env() as env, receiver() as (url, got), PahoClient() as outside:
        port = int(url.rsplit(":", 1)[1])
        # Global when the subscription is made (nothing connects then) ...
        env.resolver.answers["rebind.example.com"] = ["8.8.8.8"]
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "rb", "callback_url": f"http://rebind.example.com:{port}/hook"})
        assert r.status_code == 200, r.text
        # ... and loopback, where our receiver listens, by the time a message comes.
        env.resolver.answers["rebind.example.com"] = ["127.0.0.1"]
        await _publish_and_settle(env, outside, env.base + "rb", b"must not arrive")
        (listed,) = env.proxy.subscriptions()
        assert listed["delivery"] == "refused" and listed["failed_attempts"] == 1
        assert listed["delivered"] == 0 and listed["failed"] == 1
        assert got.empty()


async def test_an_allowed_loopback_cidr_is_delivered_to() -> None:
    async with proxy_env(allow=["127.0.0.0/8"]) as env, receiver() as (url, got), \
            PahoClient() as outside:
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "ok", "callback_url": f"{url}/hook"})
        assert r.status_code == 200, r.text
        await outside.publish(env.base + "ok", b"hello")
        request = await asyncio.wait_for(got.get(), 5)
        assert request.headers["x-subscription-id"] == r.json()["id"]
        await asyncio.wait_for(env.proxy.flush(), 5)
        (listed,) = env.proxy.subscriptions()
        assert (listed["delivery"], listed["delivered"], listed["failed_attempts"]) == (
            "delivering", 1, 0)


async def test_a_name_is_connected_to_at_its_checked_address_with_its_own_host_header(
) -> None:
    async with proxy_env(allow=["127.0.0.0/8"]) as env, receiver() as (url, got), \
            PahoClient() as outside:
        port = int(url.rsplit(":", 1)[1])
        env.resolver.answers["hooks.internal"] = ["127.0.0.1"]
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "n", "callback_url": f"http://hooks.internal:{port}/hook"})
        assert r.status_code == 200, r.text
        await outside.publish(env.base + "n", b"by name")
        request = await asyncio.wait_for(got.get(), 5)
        assert request.headers["host"] == f"hooks.internal:{port}"
        assert env.resolver.asked.count("hooks.internal") == 2  # at subscribe, at connect


async def test_failing_receiver_shows_failing_never_its_answer() -> None:
    async with proxy_env(allow=["127.0.0.1"]) as env, PahoClient() as outside:
        closed_port = _closed_port()
        r = await env.client.post("/mqtt/subscribe", json={
            "topic": env.base + "f", "callback_url": f"http://127.0.0.1:{closed_port}/hook"})
        assert r.status_code == 200, r.text
        await _publish_and_settle(env, outside, env.base + "f", b"x")
        listing = await env.client.get("/mqtt/subscriptions")
        (listed,) = listing.json()["items"]
        assert listed["delivery"] == "failing" and listed["failed_attempts"] == 2
        assert "last_error" not in listed and "Connect" not in listing.text


# -- the policy on its own --------------------------------------------------------------------
async def test_policy_unwraps_mapped_addresses_and_honours_listed_names() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return {"lan.example": ["10.1.2.3"], "mapped.example": ["::ffff:10.1.2.3"]}[host]

    strict = OutboundPolicy(resolver=resolver)
    for host in ("lan.example", "mapped.example"):
        with pytest.raises(OutboundRefusedError) as info:
            await strict.addresses(host, 80)
        assert (status_for(info.value), info.value.field, info.value.host) == (422, "callback_url",
                                                                      host)
    by_name = OutboundPolicy(allow=("LAN.example",), resolver=resolver)
    assert [str(a) for a in await by_name.addresses("lan.example", 80)] == ["10.1.2.3"]
    with pytest.raises(OutboundRefusedError):
        await by_name.addresses("mapped.example", 80)
    by_net = OutboundPolicy(allow=("10.0.0.0/8",), resolver=resolver)
    assert len(await by_net.addresses("mapped.example", 80)) == 1
    assert OutboundPolicy().address_allowed(ipaddress.ip_address("8.8.8.8"))


def test_ipv6_forms_are_judged_by_the_ipv4_address_they_carry() -> None:
    """Judged only, never connected to: NAT64 (DNS64 sites) and 6to4 of a global address
    stay usable, the same forms of loopback or link-local do not."""
    policy = OutboundPolicy()
    for carried in ("64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"):
        assert policy.address_allowed(ipaddress.ip_address(carried)), carried
    for refused in ("64:ff9b::a9fe:a9fe", "::a9fe:a9fe", "2002:a9fe:a9fe::1",
                    "::ffff:0:a9fe:a9fe", "::", "::1"):
        assert not policy.address_allowed(ipaddress.ip_address(refused)), refused
    assert OutboundPolicy(allow=("127.0.0.0/8",)).address_allowed(
        ipaddress.ip_address("64:ff9b::7f00:1"))  # listed networks match the carried address


async def test_the_client_refuses_before_connecting_and_follows_no_redirects() -> None:
    async with client(OutboundPolicy(), timeout=2) as http:
        for url in ("http://127.0.0.1:9/", "http://[::1]:9/", "http://169.254.169.254/"):
            with pytest.raises(OutboundRefusedError):
                await http.post(url)
        assert http.follow_redirects is False and http.trust_env is False


def test_allow_list_setting_on_both_services() -> None:
    env = {"PUDU_CALLBACK_CODE": "x", "CALLBACK_URL_ALLOW": "127.0.0.1/32, hooks.lan  ::1"}
    assert load_edge_settings(None, env).callback_url_allow == ("127.0.0.1/32", "hooks.lan",
                                                                "::1")
    assert load_callback_settings(None, env).callback_url_allow == ("127.0.0.1/32",
                                                                    "hooks.lan", "::1")
    for bad in ("10.0.0.0/33", "a/b", "http://x"):
        with pytest.raises(ConfigError, match="CALLBACK_URL_ALLOW"):
            load_edge_settings(None, {**env, "CALLBACK_URL_ALLOW": bad})
        with pytest.raises(ConfigError):
            parse_allow([bad])


# -- helpers --------------------------------------------------------------------------------
async def _publish_and_settle(env: Env, outside: PahoClient, topic: str, payload: bytes) -> None:
    """Publish from outside; return once the webhook worker has had its outcome."""
    arrived = asyncio.Event()
    # Added after the proxy's route, so it runs after the message was queued for the hook.
    handle = env.router.add(topic, lambda message: arrived.set())
    try:
        await outside.publish(topic, payload)
        await asyncio.wait_for(arrived.wait(), 5)
        await asyncio.wait_for(env.proxy.flush(), 5)
    finally:
        env.router.remove(handle)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error body (the one shape every app answers with)."""
    body: dict[str, Any] = response.json()
    assert body["status"] == "error", body
    return body


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
