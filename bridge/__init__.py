"""Everything MQTT shared by the edge agent and the callback server.

The Python surface for applications, and the only names this package promises to keep
where they are (``__all__``, guarded by tests/test_architecture.py):

- ``FleetClient`` (the REST MQTT proxy and the command API from Python), its
  ``Subscription``, and ``verify_signature`` (for receivers of ``callback_url`` pushes
  and alert webhooks): ``from bridge import FleetClient, verify_signature``;
- ``bridge.errors``, the one exception tree those raise;
- ``bridge.transport``, for ``InboundMessage`` (what a handler is given);
- ``bridge.compat``, whose ``MQTTProxy`` replaces the old gateway's MQTT proxy.

Every other module is the services' own and may move.

Loaded on first use (PEP 562): the client pulls in httpx and, through its command line,
rich and pygments, ~5 MiB that a service importing ``bridge.envelope`` never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge import compat, errors, transport
    from bridge.client import FleetClient, Subscription
    from bridge.signature import verify_signature

__all__ = ["FleetClient", "Subscription", "compat", "errors", "transport", "verify_signature"]

# name -> (module, attribute; None for the module itself)
_WHERE: dict[str, tuple[str, str | None]] = {
    "FleetClient": ("bridge.client", "FleetClient"),
    "Subscription": ("bridge.client", "Subscription"),
    "verify_signature": ("bridge.signature", "verify_signature"),
    "compat": ("bridge.compat", None), "errors": ("bridge.errors", None),
    "transport": ("bridge.transport", None),
}


def __getattr__(name: str) -> Any:
    """The public name, imported on first use and kept (later lookups are plain)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    module, attr = _WHERE[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value
