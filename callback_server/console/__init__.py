"""The fleet console: a browser view of robots and alerts, live, served by the app itself.

    hub.py     changed robots and alerts -> each open stream, coalesced, by org
    stream.py  the SSE response of GET /console/stream
    routes.py  GET / (sign-in or console), /console/session|logout|me|stream
    static/    the pages, script and styles (no build step, no CDN)

Sessions (the cookie and what the server keeps of it) are ``callback_server.sessions``.
"""

from callback_server.console.hub import KINDS, ConsoleClient, ConsoleHub

# The routes (``console.routes``) are not imported here: they depend on callback_server.ports,
# which imports the hub; the app includes them itself.
__all__ = ["KINDS", "ConsoleClient", "ConsoleHub"]
