"""Behind a load balancer: which peers may speak for the client, and headers every answer
carries.

A proxy in front of a service (ALB, nginx, an ingress controller) connects from its own
address and tells the client's in ``X-Forwarded-For`` / ``-Proto`` / ``-Host``. Only peers
listed in ``FORWARDED_ALLOW_IPS`` (uvicorn's own name and format: addresses, networks,
``*``; default loopback) are believed; from anyone else the headers are ignored, since
any client can send them. From a trusted peer:

- ``X-Forwarded-Proto`` and ``-For`` set the request's scheme and client, by uvicorn's own
  ``ProxyHeadersMiddleware`` (the scheme decides the console cookie's ``Secure``);
- ``X-Forwarded-Host`` becomes the ``Host`` the app sees (uvicorn leaves it alone), so
  the console's same-origin check compares the browser's ``Origin`` with the public host
  when the proxy rewrites ``Host`` to its upstream's name.

Every answer also says it may not be framed (``X-Frame-Options: DENY`` and, unless the
page sets its own policy, ``Content-Security-Policy: frame-ancestors 'none'``):
clickjacking protection for the console, the docs and any page added later.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from bridge.errors import ConfigError
from bridge.service.settings_loader import split_list

__all__ = ["DEFAULT_TRUSTED", "ENV", "ForwardedHeaders", "TrustedProxies", "unframeable"]

#: The setting's name, as uvicorn spells it.
ENV = "FORWARDED_ALLOW_IPS"
DEFAULT_TRUSTED = "127.0.0.1,::1"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_FRAME_HEADERS = [(b"x-frame-options", b"DENY")]
_NO_FRAMING = (b"content-security-policy", b"frame-ancestors 'none'")


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The peers whose ``X-Forwarded-*`` headers are believed."""

    spec: str
    networks: tuple[_Network, ...]
    everyone: bool = False

    @classmethod
    def parse(cls, value: str) -> TrustedProxies:
        """``"10.0.0.0/8, 127.0.0.1"`` or ``"*"``; a ConfigError names a bad entry."""
        items = split_list(value)
        if "*" in items:
            return cls(value, (), everyone=True)
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(f"{ENV}: {item!r} is not an address or network "
                                  "(e.g. 10.0.0.0/8, 127.0.0.1 or *)") from None
        return cls(value, tuple(networks))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TrustedProxies:
        return cls.parse(environ.get(ENV) or DEFAULT_TRUSTED)

    def __contains__(self, host: object) -> bool:
        return self.everyone or _among(self.networks, str(host))


@functools.lru_cache(maxsize=1024)
def _among(networks: tuple[_Network, ...], host: str) -> bool:
    """Whether ``host`` is in one of ``networks``; remembered, as the same few peers ask
    again and again (parsing the address was ~3 % of an ingest request's CPU)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def unframeable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with the refusal to be framed added, where the answer does not set its own."""
    names = {name.lower() for name, _ in headers}
    headers = headers + [h for h in _FRAME_HEADERS if h[0] not in names]
    if b"content-security-policy" not in names:
        headers.append(_NO_FRAMING)
    return headers


async def _applied(scope: Any, receive: Any, send: Any) -> None:
    """The app behind uvicorn's middleware in ``rewrite``: the scope is all it wanted."""


class ForwardedHeaders:
    """ASGI middleware: trusted ``X-Forwarded-*`` applied, framing refused on every answer."""

    def __init__(self, app: Any, trusted: TrustedProxies) -> None:
        self.app = app
        self.trusted = trusted
        # uvicorn's own handling of -Proto and -For, with the same list of peers.
        self._proxy = ProxyHeadersMiddleware(_applied, trusted_hosts="*" if trusted.everyone
                                             else [str(n) for n in trusted.networks])

    async def rewrite(self, scope: MutableMapping[str, Any]) -> None:
        """Apply a trusted peer's ``X-Forwarded-*`` to an HTTP ``scope`` (what a route
        answered by the server itself, bridge.http.server, gets instead of this middleware)."""
        client = scope.get("client")
        if not client or client[0] not in self.trusted:
            return  # uvicorn's middleware trusts the same peers: nothing would apply
        for name, _ in scope["headers"]:
            if name.startswith(b"x-forwarded-"):
                break
        else:
            return  # nothing forwarded (the common case): 1.7 -> 1.2 µs a request
        self._public_host(scope)
        await self._proxy(scope, None, None)  # type: ignore[arg-type]

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.rewrite(scope)

        async def framed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": unframeable(list(message.get("headers", [])))}
            await send(message)

        await self.app(scope, receive, framed)

    @staticmethod
    def _public_host(scope: MutableMapping[str, Any]) -> None:
        """``Host`` := the first (client-side) ``X-Forwarded-Host`` entry, if any."""
        forwarded = [value for name, value in scope["headers"] if name == b"x-forwarded-host"]
        if not forwarded:
            return
        host = forwarded[0].split(b",")[0].strip()
        if not host:
            return
        scope["headers"] = [(name, value) for name, value in scope["headers"]
                            if name != b"host"] + [(b"host", host)]
