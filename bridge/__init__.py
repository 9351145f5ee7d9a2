"""Everything MQTT shared by the edge agent and the callback server.

The Python surface for applications: ``FleetClient`` (the REST MQTT proxy and the
command API from Python) and ``verify_signature`` (for receivers of ``callback_url``
pushes and alert webhooks).
"""

from bridge.client import FleetClient, Subscription
from bridge.signature import verify_signature

__all__ = ["FleetClient", "Subscription", "verify_signature"]
