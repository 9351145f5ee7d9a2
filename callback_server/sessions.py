"""Console sessions: an opaque cookie that stands for a key's principal, never the key.

``POST /console/session`` trades a key for a random session id, sent to the browser as
the ``console_session`` cookie (HttpOnly, SameSite=Strict, 12 h). The server keeps only
the SHA-256 of that id with the key's name, orgs and role, so neither a memory dump nor
the browser holds anything that is a key. Sessions live in the process: a restart signs
everyone out, and with several replicas a sticky load balancer (or one console replica)
is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from callback_server.keys import Principal

__all__ = ["COOKIE", "SESSION_SECONDS", "SessionStore", "public_https", "same_origin"]

COOKIE = "console_session"
SESSION_SECONDS = 12 * 3600
#: Bound on live sessions: past it the oldest is dropped (a flood cannot fill memory).
MAX_SESSIONS = 10_000


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class _Session:
    principal: Principal
    expires: float


class SessionStore:
    """Hash of the session id -> (principal, expiry); expired ones are dropped on sight."""

    def __init__(self, seconds: float = SESSION_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.seconds = seconds
        self._clock = clock
        self._by_hash: dict[bytes, _Session] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def create(self, principal: Principal) -> str:
        """A new session for ``principal``; the id is returned once, for the cookie."""
        now = self._clock()
        if len(self._by_hash) >= MAX_SESSIONS:
            self._expire(now)
        while len(self._by_hash) >= MAX_SESSIONS:
            self._by_hash.pop(next(iter(self._by_hash)))  # dicts keep insertion order
        session_id = secrets.token_urlsafe(32)
        self._by_hash[_hash(session_id)] = _Session(principal, now + self.seconds)
        return session_id

    def lookup(self, session_id: str) -> Principal | None:
        """The principal of a live session, or None (unknown or expired)."""
        if not session_id or len(session_id) > 256:
            return None
        key = _hash(session_id)
        session = self._by_hash.get(key)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._by_hash[key]
            return None
        return session.principal

    def drop(self, session_id: str) -> bool:
        """End a session (sign-out); False if there was none."""
        return self._by_hash.pop(_hash(session_id), None) is not None

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._by_hash.items() if s.expires <= now]:
            del self._by_hash[key]


def public_https(scheme: str, origin: str | None) -> bool:
    """Whether the browser reached us over https, whatever the hops behind it did.

    ``scheme`` is the request's (a trusted proxy's ``X-Forwarded-Proto`` included); a
    browser's ``Origin`` names the scheme of its page directly, so a cookie set through a
    proxy not (yet) listed in FORWARDED_ALLOW_IPS is still ``Secure`` on an https site."""
    return scheme == "https" or (origin or "").lower().startswith("https://")


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether an ``Origin`` header names the host the request was sent to.

    Behind a proxy that rewrites ``Host``, ``host`` is the trusted ``X-Forwarded-Host``
    (bridge.forwarded), i.e. the host the browser asked for.

    A cookie rides along on any request the browser makes to this host, so a
    state-changing request made with it must prove it came from a page of this host
    (SameSite=Strict already stops most cross-site sends; this is the second lock)."""
    if not origin or not host or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return hmac.compare_digest(parts.netloc.lower(), host.lower())
