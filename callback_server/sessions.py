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

__all__ = ["COOKIE", "MAX_PER_KEY", "SESSION_SECONDS", "SessionStore", "public_https",
           "same_origin"]

COOKIE = "console_session"
SESSION_SECONDS = 12 * 3600
#: Bound on one key's live sessions: past it that key's oldest is dropped, so a key signing
#: in again and again (a script, a leaked key) ends only its own sessions, never another's.
MAX_PER_KEY = 50
#: Bound on all live sessions (memory): past it the oldest session of the key holding the
#: most goes, so keys with a few sessions each keep theirs.
MAX_SESSIONS = 10_000


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class _Session:
    principal: Principal
    expires: float


class SessionStore:
    """Hash of the session id -> (principal, expiry), grouped by key name (oldest first);
    expired ones are dropped on sight."""

    def __init__(self, seconds: float = SESSION_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.seconds = seconds
        self._clock = clock
        self._by_hash: dict[bytes, _Session] = {}
        #: key name -> its sessions' hashes, oldest first (dicts keep insertion order)
        self._by_key: dict[str, dict[bytes, None]] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def count(self, key_name: str) -> int:
        """Live (or not yet noticed expired) sessions of one key."""
        return len(self._by_key.get(key_name, ()))

    def create(self, principal: Principal) -> str:
        """A new session for ``principal``; the id is returned once, for the cookie."""
        now = self._clock()
        mine = self._by_key.setdefault(principal.name, {})
        if len(mine) >= MAX_PER_KEY or len(self._by_hash) >= MAX_SESSIONS:
            self._expire(now)
            mine = self._by_key.setdefault(principal.name, {})
        while len(mine) >= MAX_PER_KEY:
            self._remove(next(iter(mine)))
        while len(self._by_hash) >= MAX_SESSIONS:
            crowded = max(self._by_key.values(), key=len)
            self._remove(next(iter(crowded)))
        session_id = secrets.token_urlsafe(32)
        key = _hash(session_id)
        self._by_hash[key] = _Session(principal, now + self.seconds)
        self._by_key.setdefault(principal.name, {})[key] = None
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
            self._remove(key)
            return None
        return session.principal

    def drop(self, session_id: str) -> bool:
        """End a session (sign-out); False if there was none."""
        return self._remove(_hash(session_id))

    def _remove(self, key: bytes) -> bool:
        session = self._by_hash.pop(key, None)
        if session is None:
            return False
        mine = self._by_key.get(session.principal.name)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_key[session.principal.name]
        return True

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._by_hash.items() if s.expires <= now]:
            self._remove(key)


def public_https(scheme: str, origin: str | None) -> bool:
    """Whether the browser reached us over https, whatever the hops behind it did.

    ``scheme`` is the request's (a trusted proxy's ``X-Forwarded-Proto`` included); a
    browser's ``Origin`` names the scheme of its page directly, so a cookie set through a
    proxy not (yet) listed in FORWARDED_ALLOW_IPS is still ``Secure`` on an https site."""
    return scheme == "https" or (origin or "").lower().startswith("https://")


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether an ``Origin`` header names the host the request was sent to.

    Behind a proxy that rewrites ``Host``, ``host`` is the trusted ``X-Forwarded-Host``
    (bridge.http.forwarded), i.e. the host the browser asked for.

    A cookie rides along on any request the browser makes to this host, so a
    state-changing request made with it must prove it came from a page of this host
    (SameSite=Strict already stops most cross-site sends; this is the second lock)."""
    if not origin or not host or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return hmac.compare_digest(parts.netloc.lower(), host.lower())
