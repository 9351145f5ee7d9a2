"""The httpx transport behind ``bridge.http.outbound.client``: it checks the address of every
connection it opens.

httpx has no public way to give its connection pool a network backend, so the pool is
built here from httpcore's public arguments with ours: ``connect_tcp`` resolves the
origin's host through the policy, checks every address, and connects to a checked one.
TLS still verifies, and sends SNI for, the host name of the URL (httpcore takes both
from the origin), and the pool is keyed by that name, so one name's connection is never
reused for another's. Imported lazily (httpx and httpcore cost ~4.5 MiB).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Protocol

import httpcore
import httpx

from bridge.errors import OutboundRefusedError


class AddressPolicy(Protocol):
    """What the transport needs of ``bridge.http.outbound.OutboundPolicy`` (named here, not
    imported, so the policy's module and this one do not import each other)."""

    async def addresses(self, host: str, port: int, *, field: str = ...
                        ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]: ...


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """anyio's TCP connect, to the policy's checked addresses only."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's signature
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        error: Exception | None = None
        for address in await self._policy.addresses(host, port):
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc  # try the next checked address, as getaddrinfo's callers do
        assert error is not None  # addresses() never returns an empty list
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise OutboundRefusedError("unix sockets are not an outbound destination", host=path)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class OutboundTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` (HTTP/1.1, default limits) over ``CheckedBackend``."""

    def __init__(self, policy: AddressPolicy, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedBackend(policy),
        )
