"""Where the product may send HTTP on a user's behalf, and the one client that obeys it.

The rule: an address may be connected to when ``ipaddress`` calls it global and it is
neither multicast nor reserved (after unwrapping the IPv4 address an IPv6 one carries:
mapped, compatible, NAT64 ``64:ff9b::/96``, 6to4; so ``::ffff:127.0.0.1`` is loopback),
or when it lies in a network the operator lists in ``CALLBACK_URL_ALLOW``; a host name
listed there is allowed whatever it resolves to. Anything else (loopback, private,
link-local such as the 169.254.169.254 metadata service, 0.0.0.0, multicast, reserved)
is refused, so a token holder cannot make the service probe or call what only it can
reach.

A host name is resolved and every address it resolves to is checked, when the URL is
given (``check_url``: a clear 422) and again at every connection the client makes
(``client``): the connection goes to a checked address, never to a fresh lookup, so a
name that later resolves to 127.0.0.1 (DNS rebinding) is refused then too. The client
follows no redirects and ignores proxy settings from the environment (a proxy would be
the address connected to, and would connect wherever it is told).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from bridge.errors import ConfigError, OutboundRefusedError

if TYPE_CHECKING:
    import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``resolver(host, port)``: the addresses a name stands for, as strings.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

RULE = ("outbound calls go only to globally routable addresses unless CALLBACK_URL_ALLOW "
        "lists the host or its network")


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer (``getaddrinfo``), each address once, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


#: IPv6 forms that carry an IPv4 address a connection may end up at: NAT64's well-known
#: prefix (RFC 6052; 64:ff9b::a9fe:a9fe is 169.254.169.254 through the translator) and
#: 6to4 (RFC 3056). IPv4-mapped and IPv4-compatible (``::a.b.c.d``) are handled apart.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64, 6to4): judge that.

    ``ipaddress`` calls ``::7f00:1`` (IPv4-compatible 127.0.0.1) and NAT64 addresses
    global, so judging the IPv6 form alone would let them through.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    value = int(address)
    if address in _NAT64 or (value >> 32 == 0 and value > 1):  # not :: or ::1 themselves
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return address


def address_class(address: IPAddress) -> str:
    """Why an address is not global, in the words an operator would use."""
    address = unwrap(address)
    for name in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    return "not globally routable"


def parse_allow(entries: Iterable[str]) -> tuple[tuple[IPNetwork, ...], frozenset[str]]:
    """``CALLBACK_URL_ALLOW`` entries as (networks, host names); ConfigError on a bad one."""
    networks: list[IPNetwork] = []
    hosts: set[str] = set()
    for raw in entries:
        entry = raw.strip().lower().strip("[]")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if "/" in entry or not all(part and len(part) <= 63 for part in entry.split(".")) \
                or not all(c.isalnum() or c in "-._" for c in entry):
            raise ConfigError(f"callback_url_allow: {raw!r} is neither a host name nor a CIDR")
        hosts.add(entry.rstrip("."))
    return tuple(networks), frozenset(hosts)


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """The outbound rule with the operator's exceptions; the resolver can be swapped (tests)."""

    allow: tuple[str, ...] = ()
    resolver: Resolver = system_resolver
    resolve_timeout: float = 5.0
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False)
    _hosts: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        networks, hosts = parse_allow(self.allow)
        object.__setattr__(self, "_networks", networks)
        object.__setattr__(self, "_hosts", hosts)

    def address_allowed(self, address: IPAddress) -> bool:
        """Global unicast, or inside a listed network (checked as given and unwrapped)."""
        plain = unwrap(address)
        # ipaddress calls 224/4 global, and on Python 3.11 SIIT's ::ffff:0:a.b.c.d too
        # (reserved: it lies in ::/8).
        if plain.is_global and not plain.is_multicast and not plain.is_reserved:
            return True
        return any(a in net for a in {address, plain} for net in self._networks
                   if a.version == net.version)

    async def addresses(self, host: str, port: int, *,
                        field: str = "callback_url") -> list[IPAddress]:
        """Every address ``host`` stands for, each checked; OutboundRefusedError otherwise."""
        name = host.lower().strip("[]").rstrip(".")
        try:
            literal: IPAddress | None = ipaddress.ip_address(name)
        except ValueError:
            literal = None
        if literal is not None:
            if not self.address_allowed(literal):
                raise OutboundRefusedError(
                    f"{field} host {host!r} is not globally routable "
                    f"({address_class(literal)}): {RULE}",
                    host=host, field=field)
            return [literal]
        # One message whether the name does not resolve or resolves somewhere refused: a
        # token holder learns neither the address nor which names exist inside.
        refused = OutboundRefusedError(
            f"{field} host {host!r} does not resolve to a globally routable address: {RULE}",
            host=host, field=field)
        try:
            async with asyncio.timeout(self.resolve_timeout):
                found = [ipaddress.ip_address(a.split("%", 1)[0])
                         for a in await self.resolver(name, port)]
        except (OSError, TimeoutError, ValueError) as exc:
            raise refused from exc
        if not found:
            raise refused
        if name in self._hosts:
            return found
        if not all(self.address_allowed(address) for address in found):
            raise refused
        return found

    async def check_url(self, url: str, *, field: str = "callback_url") -> None:
        """An http(s) URL whose host is allowed now; OutboundRefusedError (422) otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise OutboundRefusedError(f"{field} is not a URL: {exc}", host="",
                                       field=field) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OutboundRefusedError(f"{field} must be an http:// or https:// URL with a host",
                                       host=parts.hostname or "", field=field)
        await self.addresses(parts.hostname, port, field=field)


def client(policy: OutboundPolicy, *, timeout: float) -> httpx.AsyncClient:
    """An httpx client that connects only to addresses ``policy`` allows, checked per connect.

    Redirects are off and environment proxies ignored. httpx is imported here, not at
    module level: a gateway that sends no webhooks saves ~4.5 MiB.
    """
    import httpx

    from bridge.http.outbound_transport import OutboundTransport

    return httpx.AsyncClient(transport=OutboundTransport(policy), follow_redirects=False,
                             trust_env=False, timeout=timeout)
