"""Who may do what on the callback server: a request's key resolved to a Principal, and the rules.

Refusals, each counted in ``callback_auth_refused_total{reason}``:

- no key, or one the ring does not know: 401 (``missing``, ``unknown``); a console
  session cookie stands in for a key, and a state-changing request made with it
  without an ``Origin`` of this host is 403 (``cross_origin``);
- a role that may not do this, inside its own orgs: 403 (``forbidden_role``);
- a robot, gateway or event of an org the key does not cover: 404, never confirming that
  it exists (``foreign_org``); a topic filter or an ingested envelope reaching beyond the
  key's orgs: 403 (``foreign_org``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, cast

from fastapi import Depends, Request
from prometheus_client import Counter

from bridge.errors import AuthError, ForbiddenError, NotFoundError
from bridge.proxy import ProxyAction, ProxyAuthorize
from bridge.topic import TopicFilter, normalize_prefix
from callback_server.keys import ALL_ORGS, KeyRing, Principal, Role
from callback_server.sessions import COOKIE, SessionStore, same_origin

__all__ = ["ADMINS", "INGESTERS", "OPERATORS", "READERS", "REFUSAL_REASONS", "Access", "Admin",
           "Caller", "Ingester", "Operator", "Principal", "Reader", "Rules", "access_of",
           "header", "ingester_of"]

#: The ``reason`` labels of ``callback_auth_refused_total``.
REFUSAL_REASONS = ("missing", "unknown", "forbidden_role", "foreign_org", "cross_origin")
#: Methods that change nothing: a cookie needs no Origin proof for these.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Roles that may use the read API and live streams.
READERS: tuple[Role, ...] = ("viewer", "operator", "admin")
#: Roles that may send commands and publish or subscribe through the REST proxy.
OPERATORS: tuple[Role, ...] = ("operator", "admin")
#: Roles that may do everything.
ADMINS: tuple[Role, ...] = ("admin",)
#: Roles that may push envelopes to ``POST /callback/messages``.
INGESTERS: tuple[Role, ...] = ("ingest", "admin")

_NO_KEYS = ("no API key is configured on this server: create one with "
            "`callback-server keys add --name NAME --org ORG --role viewer` and set "
            "API_KEYS_FILE (or set PROXY_TOKEN), then send it as 'Authorization: Bearer <key>'")


class Access:
    """Resolves callers and applies the rules; one per server, shared by every route."""

    def __init__(self, keys: KeyRing, refused: Counter, topic_prefix: str = "",
                 sessions: SessionStore | None = None) -> None:
        self.keys = keys
        self.sessions = sessions if sessions is not None else SessionStore()
        self.refused = refused
        self.topic_prefix = normalize_prefix(topic_prefix)

    def _refuse(self, reason: str) -> None:
        self.refused.labels(reason=reason).inc()

    def principal(self, request: Request, *, callback_header: bool = False) -> Principal:
        """The caller's principal from ``Authorization: Bearer`` (or, where ingest is
        served, ``X-Callback-Token``), else from a console session cookie; AuthError
        (401) otherwise. A bearer key wins over a cookie."""
        key = _bearer_key(request)
        if not key and callback_header:
            key = header(request, b"x-callback-token").strip()
        if not key and COOKIE in request.cookies:
            return self._session(request)
        if not key:
            self._refuse("missing")
            message = "missing bearer token" if len(self.keys) else _NO_KEYS
            raise AuthError(message, bearer=True)
        principal = self.keys.lookup(key)
        if principal is None:
            self._refuse("unknown")
            raise AuthError("invalid key", bearer=True)
        return principal

    def bearer_principal(self, request: Request) -> Principal | None:
        """The principal of the request's ``Authorization: Bearer`` key, None when there
        is none or the ring does not know it: for a route open to all that shows more to a
        known key (health), so nothing is refused or counted."""
        key = _bearer_key(request)
        return self.keys.lookup(key) if key else None

    def lasting(self, request: Request, principal: Principal) -> Callable[[], bool]:
        """For what outlives ``request`` (a stream): true while the principal's key is
        still loaded (removed or changed on SIGHUP: false) and, when the request came by
        console cookie, while its session lives (a sign-out ends it)."""
        session_id = None if _bearer_key(request) else request.cookies.get(COOKIE)

        def alive() -> bool:
            if not self.keys.holds(principal):
                return False
            return session_id is None or self.sessions.lookup(session_id) is not None

        return alive

    def _session(self, request: Request) -> Principal:
        """The principal of the request's console session (401 if none is live); a
        state-changing request must also come from a page of this host (403)."""
        session_id = request.cookies[COOKIE]
        principal = self.sessions.lookup(session_id)
        if principal is None:
            self._refuse("unknown")
            raise AuthError("console session expired or signed out; sign in again")
        if not self.keys.holds(principal):
            self.sessions.drop(session_id)
            self._refuse("unknown")
            raise AuthError("the key this console session was opened with was removed or "
                            "changed; sign in again")
        if request.method not in _SAFE_METHODS:
            self.require_same_origin(request, "a request made with the console session")
        return principal

    def require_same_origin(self, request: Request, what: str) -> None:
        """403 unless the request's ``Origin`` is this host (see sessions.same_origin)."""
        if not same_origin(request.headers.get("origin"), request.headers.get("host")):
            self._refuse("cross_origin")
            raise ForbiddenError(f"{what} must carry an Origin of this host")

    def from_key(self, key: str) -> Principal:
        """The principal of a key given in a body (console sign-in); 401 if unknown."""
        principal = self.keys.lookup(key)
        if principal is None:
            self._refuse("unknown")
            raise AuthError("invalid key")
        return principal

    def require_role(self, principal: Principal, roles: Iterable[Role], what: str) -> None:
        """403 unless the principal's role is one of ``roles``."""
        allowed = tuple(roles)
        if principal.role not in allowed:
            self._refuse("forbidden_role")
            raise ForbiddenError(f"key {principal.name!r} (role {principal.role}) may not {what}; "
                                 f"that needs one of: {', '.join(allowed)}")

    def require_operator(self, principal: Principal, what: str) -> None:
        """403 unless the principal may operate: for routes that first answer 404 for
        what another org owns, so the role is checked only once the thing is visible."""
        self.require_role(principal, OPERATORS, what)

    def console_principal(self, key: str) -> Principal:
        """The principal a console sign-in key opens a session for: 401 if the key is
        unknown, 403 if its role may not read."""
        principal = self.from_key(key)
        self.require_role(principal, READERS, "use the console")
        return principal

    def require_all_orgs(self, principal: Principal, what: str) -> None:
        """403 unless the key covers every org (``orgs: ["*"]``)."""
        if not principal.all_orgs:
            self._refuse("forbidden_role")
            raise ForbiddenError(f"{what} needs a key whose orgs are [\"*\"]")

    def require_org(self, principal: Principal, org: str | None, not_found: str) -> None:
        """404 (``not_found``) unless the key covers ``org``: never confirm it exists."""
        if not principal.covers(org):
            self._refuse("foreign_org")
            raise NotFoundError(not_found)

    def refuse_foreign(self, principal: Principal, orgs: Iterable[str]) -> None:
        """403 naming the orgs of ``orgs`` the key does not cover, if any."""
        foreign = sorted({o for o in orgs if not principal.covers(o)})
        if foreign:
            self._refuse("foreign_org")
            raise ForbiddenError(f"key {principal.name!r} does not cover org "
                                 f"{', '.join(map(repr, foreign))}")

    def receiver_orgs(self, principal: Principal, requested: Iterable[str] | None,
                      ) -> tuple[str, ...]:
        """The orgs a webhook or alert subscription created by ``principal`` serves: those
        ``requested``, else all the key's; 403 unless the key covers every one."""
        orgs = tuple(requested) if requested else (
            (ALL_ORGS,) if principal.all_orgs else tuple(sorted(principal.orgs)))
        if not principal.covers_all(orgs):
            self.refuse_foreign(principal, [o for o in orgs if o != ALL_ORGS] or ["*"])
            raise ForbiddenError(f"key {principal.name!r} does not cover every org")
        return orgs

    def filter_covered(self, principal: Principal, topic_filter: str) -> bool:
        """Whether every topic ``topic_filter`` can match is under one of the key's orgs."""
        if principal.all_orgs:
            return True
        rest = topic_filter.removeprefix(self.topic_prefix) \
            if topic_filter.startswith(self.topic_prefix) else None
        if rest is None:
            return False
        levels = rest.split("/")
        return len(levels) >= 2 and levels[0] == "org" and levels[1] in principal.orgs

    def require_filter(self, principal: Principal, topic_filter: str) -> None:
        """403 unless the topic or filter stays inside the key's orgs (``#``, ``org/+/#``
        or another org's subtree do not)."""
        TopicFilter(topic_filter)  # an invalid one is a 422 from the proxy, not a 403
        if not self.filter_covered(principal, topic_filter):
            self._refuse("foreign_org")
            raise ForbiddenError(f"key {principal.name!r} may only use topics under its orgs "
                                 f"({self.topic_prefix}org/<org>/...); {topic_filter!r} reaches "
                                 "beyond them", field="topic")

    def proxy_hook(self) -> ProxyAuthorize:
        """The REST proxy's ``authorize``: readers see and stream their orgs' topics;
        operators also publish and subscribe there."""

        def authorize(request: Request, action: ProxyAction,
                      topic: str | None) -> Callable[[str], bool]:
            principal = self.principal(request)
            if action in ("status", "subscriptions", "stream"):
                self.require_role(principal, READERS, f"read the MQTT proxy ({action})")
            else:
                self.require_role(principal, OPERATORS, f"{action} through the MQTT proxy")
            if topic is not None:
                self.require_filter(principal, topic)
            alive = self.lasting(request, principal)

            def visible(topic_filter: str) -> bool:
                """Also asked again by a stream before each message: what the key (and
                a console session's cookie) no longer allows ends it."""
                return alive() and self.filter_covered(principal, topic_filter)

            return visible

        return authorize


def _bearer_key(request: Request) -> str:
    """The key of ``Authorization: Bearer <key>``; empty when there is none."""
    scheme, _, value = header(request, b"authorization").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def header(request: Request, name: bytes) -> str:
    """A request header's first value ('' when absent), ``name`` lower-case as ASGI gives
    it. Starlette's ``headers.get`` raises and catches a KeyError for every absent header
    (the ingest's ``Authorization``): both of the ingest's lookups took 3.3 µs, now 1.3."""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


# -- what routes get through Depends: the access rules, the caller and its role ------------
# Each dependency is ``async def``: FastAPI runs a plain ``def`` one in a worker thread, a
# thread hop per dependency per request (a quarter of the HTTP ingest's CPU went to it).
def _access(request: Request) -> Access:
    """The server's one Access (``app.state.access``, set when its app is built)."""
    return cast(Access, request.app.state.access)


async def access_of(request: Request) -> Access:
    return _access(request)


async def _caller(request: Request) -> Principal:
    return _access(request).principal(request)


def _with_role(roles: tuple[Role, ...], what: str) -> Callable[[Request], Awaitable[Principal]]:
    async def principal(request: Request) -> Principal:
        access = _access(request)
        caller = access.principal(request)
        access.require_role(caller, roles, what)
        return caller

    return principal


async def ingester_of(request: Request) -> Principal:
    """``X-Callback-Token`` also names the key here: an AWS IoT Rule sets no bearer."""
    access = _access(request)
    caller = access.principal(request, callback_header=True)
    access.require_role(caller, INGESTERS, "ingest messages")
    return caller


#: The access rules, for what a route checks beyond the caller's role (orgs, origins).
Rules = Annotated[Access, Depends(access_of)]
#: Any known key or live console session, whatever its role (401 otherwise).
Caller = Annotated[Principal, Depends(_caller)]
#: A key that may use the read API and live streams (403 for other roles).
Reader = Annotated[Principal, Depends(_with_role(READERS, "use the read API"))]
#: A key that may send commands and manage subscriptions and webhooks.
Operator = Annotated[Principal, Depends(_with_role(OPERATORS, "manage or command the fleet"))]
#: A key with the admin role.
Admin = Annotated[Principal, Depends(_with_role(ADMINS, "administer the server"))]
#: A key that may push envelopes to ``POST /callback/messages``.
Ingester = Annotated[Principal, Depends(ingester_of)]
