"""What both services know of Pudu's callbacks: the one normaliser (``normalize``).

The edge agent's webhook, its cloud poller and the callback server's own webhook
(deployments without a gateway) all turn a callback into the same envelope fields here,
so a robot's rows do not depend on which path its callback took.
"""

from bridge.pudu.normalize import (
    CHANNELS,
    COMPACTABLE,
    DEFAULT_MAX_SKEW,
    DOCUMENTED_TYPES,
    MS_THRESHOLD,
    Normalized,
    normalize,
    to_seconds,
)

__all__ = ["CHANNELS", "COMPACTABLE", "DEFAULT_MAX_SKEW", "DOCUMENTED_TYPES", "MS_THRESHOLD",
           "Normalized", "normalize", "to_seconds"]
