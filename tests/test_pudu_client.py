"""The signed client against the stub Pudu API (a real uvicorn server on a free port)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from bridge.errors import (
    PuduAuthError,
    PuduBusinessError,
    PuduConnectError,
    PuduRateLimitError,
    PuduServerError,
)
from edge_agent.pudu import signing
from edge_agent.pudu.api_client import PuduClient
from edge_agent.pudu.settings import PuduApiSettings
from tests.support.procs import free_port
from tests.support.pudu_stub import KEY, MAX_SKEW, SECRET, StubServer, serve_stub


@pytest.fixture
def stub() -> Iterator[StubServer]:
    yield from serve_stub()


def settings(url: str, **kw: object) -> PuduApiSettings:
    base: dict[str, object] = {"api_url": url, "api_key": KEY, "api_secret": SECRET,
                               "timeout_seconds": 1.0, "max_retries": 2,
                               "retry_max_seconds": 0.2}
    return PuduApiSettings.model_validate({**base, **kw})


async def test_signed_calls_are_accepted_and_pages_are_followed(stub: StubServer) -> None:
    for i in range(57):
        stub.stub.add_robot(f"R{i:03d}", "12345")
    stub.stub.add_robot("OTHER", "999")
    async with PuduClient(settings(stub.url)) as client:
        robots = await client.robots("12345")
        state = await client.status("R001")
        await client.position_reporting("R001", 1, 10)
    assert sorted(r["sn"] for r in robots) == [f"R{i:03d}" for i in range(57)]
    assert len(stub.stub.calls_to("/v1/api/robot")) == 2  # pages of 50
    assert state["battery"] == 85
    assert stub.stub.unauthorized == []
    assert client.calls == 4 and client.retries == 0


@pytest.mark.parametrize("change", ["secret", "key", "stale", "future"])
async def test_wrong_signature_key_or_date_is_401_and_not_retried(
        stub: StubServer, change: str) -> None:
    stub.stub.add_robot("R1", "1")
    kw: dict[str, object] = {"api_secret": "wrong"} if change == "secret" else \
        {"api_key": "other"} if change == "key" else {}
    client = PuduClient(settings(stub.url, **kw))
    if change in ("stale", "future"):
        # A minute past the window: x-date drops the fraction of a second, so a clock
        # 901 s ahead can be read as 900.x s ahead, and accepted.
        skew = MAX_SKEW + 60
        client.clock = lambda: time.time() + (-skew if change == "stale" else skew)
    async with client:
        with pytest.raises(PuduAuthError) as info:
            await client.status("R1")
    assert info.value.status == 401 and client.calls == 1
    assert stub.stub.unauthorized


async def test_stub_refuses_a_wrong_content_md5_and_a_missing_date(stub: StubServer) -> None:
    body = signing.body_bytes({"sn": "R1", "payload": {"interval": 1, "times": 2}})
    path = "/pudu-entry/open-platform-service/v1/position_command"
    headers = signing.signed_headers(key=KEY, secret=SECRET, method="POST", path=path,
                                     body=body, now=time.time())
    async with httpx.AsyncClient(base_url=stub.url) as c:
        ok = await c.post(path, content=body, headers=headers)
        bad = await c.post(path, content=body + b" ", headers=headers)
        md5 = await c.post(path, content=body, headers={
            **headers, "Content-MD5": base64md5_raw(body)})
        no_date = await c.post(path, content=body, headers={
            k: v for k, v in headers.items() if k != "x-date"})
    assert ok.status_code == 200  # R1 unknown: a business error, but signed correctly
    assert (bad.status_code, md5.status_code, no_date.status_code) == (401, 401, 401)
    assert "Content-MD5" in md5.json()["message"] and "x-date" in no_date.json()["message"]


def base64md5_raw(body: bytes) -> str:
    import base64
    import hashlib
    return base64.b64encode(hashlib.md5(body).digest()).decode()  # the trap: raw digest


@pytest.mark.parametrize("kind", ["429", "500", "stall"])
async def test_transient_failures_are_retried_within_bounds(stub: StubServer, kind: str) -> None:
    stub.stub.add_robot("R1", "1")
    stub.stub.stall_seconds = 3
    stub.stub.fail("/v2/status", kind, times=2)
    async with PuduClient(settings(stub.url)) as client:
        started = time.monotonic()
        state = await client.status("R1")
    assert state["sn"] == "R1"
    assert client.calls == 3 and client.retries == 2
    assert time.monotonic() - started < 6


async def test_persistent_failure_gives_up_after_the_bound(stub: StubServer) -> None:
    stub.stub.add_robot("R1", "1")
    stub.stub.fail("/v2/status", "429", times=10)
    stub.stub.fail("/v1/status", "500", times=10)
    async with PuduClient(settings(stub.url, max_retries=1)) as client:
        with pytest.raises(PuduRateLimitError) as limited:
            await client.status("R1")
        with pytest.raises(PuduServerError):
            await client.status_v1("R1")
    assert limited.value.retries == 1 and client.calls == 4


async def test_business_error_is_typed_with_pudus_message(stub: StubServer) -> None:
    async with PuduClient(settings(stub.url)) as client:
        with pytest.raises(PuduBusinessError) as info:
            await client.recharge("NOPE")
    assert info.value.message == "ROBOT_NOT_FOUND" and client.calls == 1


def test_settings_aliases_and_http_only_for_loopback() -> None:
    assert PuduApiSettings(api_url="us").api_url == "https://csu-open-platform.pudutech.com"
    assert PuduApiSettings(api_url="http://127.0.0.1:9/pudu-entry").api_url == \
        "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="loopback"):
        PuduApiSettings(api_url="http://open-platform.pudutech.com")


@pytest.mark.parametrize("word", ["ok", "success", "Ok"])
async def test_ok_and_lower_case_success_are_success(stub: StubServer, word: str) -> None:
    stub.stub.add_robot("R1", "1")
    stub.stub.success = word
    async with PuduClient(settings(stub.url)) as client:
        state = await client.status("R1")
    assert state["sn"] == "R1" and client.calls == 1


@pytest.mark.parametrize("as_text", [False, True])
async def test_fault_log_and_robot_list_follow_every_page(stub: StubServer,
                                                          as_text: bool) -> None:
    stub.stub.counts_as_text = as_text  # Pudu's count/total may come as strings
    at = time.time() - 600
    for i in range(45):
        stub.stub.add_error("R1", "1", at + i, f"vir_{i}")
    for i in range(57):
        stub.stub.add_robot(f"R{i:03d}", "1")
    async with PuduClient(settings(stub.url)) as client:
        rows = await client.error_log("1", int(at) - 60, int(time.time()))
        robots = await client.robots("1")
    assert sorted(r["error_id"] for r in rows) == sorted(f"vir_{i}" for i in range(45))
    assert len(stub.stub.calls_to("/log/error/query_list")) == 3  # pages of 20
    assert len(robots) == 57 and len(stub.stub.calls_to("/v1/api/robot")) == 2


@pytest.mark.parametrize("kind", ["stall", "500"])
async def test_a_robot_command_reaches_the_api_once_after_a_stall_or_500(
        stub: StubServer, kind: str) -> None:
    stub.stub.add_robot("R1", "1")
    stub.stub.stall_seconds = 1.5  # beyond the 1 s timeout: it may have acted
    for path in ("/v2/recharge", "/v1/switch_map", "/v1/position_command"):
        stub.stub.fail(path, kind, times=5)
    async with PuduClient(settings(stub.url)) as client:
        commands: list[Callable[[], Awaitable[Any]]] = [
            lambda: client.recharge("R1"),
            lambda: client.switch_map("R1", "floor-2", "code-42"),
            lambda: client.position_reporting("R1", 1, 5)]
        for call in commands:
            with pytest.raises(PuduServerError, match="not repeated"):
                await call()
    for path in ("/v2/recharge", "/v1/switch_map", "/v1/position_command"):
        assert len(stub.stub.calls_to(path)) == 1, path
    assert client.retries == 0


async def test_a_robot_command_is_retried_after_a_429(stub: StubServer) -> None:
    stub.stub.add_robot("R1", "1")
    stub.stub.fail("/v2/recharge", "429")  # the gateway refused it: it did not act
    async with PuduClient(settings(stub.url)) as client:
        result = await client.recharge("R1")
    assert result["taskId"] == "t-recharge"
    assert len(stub.stub.calls_to("/v2/recharge")) == 2 and client.retries == 1


async def test_a_robot_command_is_retried_when_no_connection_was_made() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: the request never went out
    async with PuduClient(settings(dead)) as client:
        with pytest.raises(PuduConnectError):
            await client.recharge("R1")
    assert client.calls == 3 and client.retries == 2
