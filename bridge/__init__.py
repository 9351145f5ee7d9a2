"""Everything MQTT shared by the edge agent and the callback server."""
