"""``probe``: the container health check, in the standard library only.

Slim images have no curl, and an orchestrator runs its health command every few seconds,
so this is one HTTP GET of the service's own health ``?ready=1`` on loopback, with a
timeout, and an exit code: 0 ready, 1 anything else (one line on stderr says what).
"""

from __future__ import annotations

import http.client
import sys
from urllib.parse import urlsplit

__all__ = ["local_url", "probe"]

#: Addresses that mean "every interface": probed on the matching loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def local_url(host: str, port: int, path: str) -> str:
    """The URL of ``path`` on a listener bound to ``host``:``port``, seen from this host."""
    address = _WILDCARDS.get(host, host)
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port}{path}"


def probe(prog: str, url: str, timeout: float) -> int:
    """GET ``url``: 0 on a 200, else 1 with the status (and the body's reason) on stderr."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        print(f"{prog}: probe: not an http:// URL: {url}", file=sys.stderr)
        return 1
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", target, headers={"User-Agent": f"{prog}-probe"})
        response = conn.getresponse()
        body = response.read(2048).decode("utf-8", "replace").strip()
    except OSError as exc:  # refused, reset, timed out: not listening (yet)
        print(f"{prog}: probe: {url}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if response.status == 200:
        return 0
    print(f"{prog}: probe: {url} answered {response.status}: {body[:300]}", file=sys.stderr)
    return 1
