"""The robot commands a gateway runs through the Pudu cloud API, and their arguments.

The edge agent registers a handler for each name (edge_agent/pudu/robot_commands.py); the
callback server's console offers a form for each, labelled and filled as here (it
reads them from ``/console/me``), so a command added here reaches both.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["ROBOT_COMMANDS"]

#: name, button label, and each argument: key, input label, input type, default value.
ROBOT_COMMANDS: Final[tuple[dict[str, Any], ...]] = (
    {"name": "pudu.recharge", "label": "Recharge", "args": []},
    {"name": "pudu.switch_map", "label": "Switch map",
     "args": [{"key": "map_name", "label": "map name", "type": "text"}]},
    {"name": "pudu.position_reporting", "label": "Report position",
     "args": [{"key": "interval", "label": "every (s)", "type": "number", "value": "1"},
              {"key": "times", "label": "times", "type": "number", "value": "60"}]},
)
