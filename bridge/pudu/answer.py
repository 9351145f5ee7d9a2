"""The answer to an accepted Pudu callback, one shape for the edge's and the cloud's webhook.

It keeps the replaced receiver's fields (``message`` naming what was processed,
``data.robot_sn`` and ``data.status``) and adds the topic, the message id and whether the
callback was a retry of one already accepted.
"""

from __future__ import annotations

from typing import Any

from bridge.pudu.normalize import Normalized

#: ``openapi_extra`` of both webhook routes (edge and cloud): what Pudu posts, and the
#: header that names the sender.
CALLBACK_REQUEST: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object",
        "required": ["callback_type", "data"],
        "properties": {
            "callback_type": {"type": "string", "example": "notifyRobotStatus"},
            "data": {"type": "object", "required": ["sn"],
                     "properties": {"sn": {"type": "string"}},
                     "additionalProperties": True}}}}}},
    "parameters": [
        {"name": "CallbackCode", "in": "header", "required": True, "schema": {"type": "string"}},
        {"name": "TraceId", "in": "header", "required": False, "schema": {"type": "string"}},
    ],
}

#: What each channel's answer names: the normalised field that says most about it.
_HEADLINE = {"status": "status", "power": "battery_level", "move": "move_state",
             "task": "task_status", "event": "event_type"}


def processed(norm: Normalized) -> str:
    """``Robot status processed: online``: the replaced receiver's message, for every
    channel (the value left out when the callback did not carry it)."""
    who = "Robot" if norm.device_id is not None else "Shop"
    what = norm.channel if not norm.channel.startswith("callback/") else norm.callback_type
    text = f"{who} {what} processed"
    field = _HEADLINE.get(norm.channel)
    value = norm.data.get(field) if field else None
    if norm.channel == "event" and value is not None:
        value = f"{value} ({norm.data.get('event_level')})"
    elif norm.channel == "power" and value is not None:
        value = f"{value}%"
    elif norm.channel == "pose" and "x" in norm.data and "y" in norm.data:
        value = f"x={norm.data['x']}, y={norm.data['y']}"
    return text if value is None else f"{text}: {str(value)[:80]}"


def accepted(norm: Normalized, now: float, topic: str, message: str, *,
             duplicate: bool = False, forwarded: bool = True) -> dict[str, Any]:
    """The 200 body for a callback committed (to the outbox, or to the database)."""
    data: dict[str, Any] = {
        "robot_sn": norm.device_id,
        "callback_type": norm.callback_type,
        "message_id": norm.message_id,
        "topic": topic,
        "duplicate": duplicate,
    }
    # The replaced receiver's `data.status`: the normalised state the robot reported.
    status = norm.data.get("status")
    if isinstance(status, str):
        data["status"] = status
    if not forwarded:
        data["forwarded"] = False
    return {"status": "success", "message": f"{processed(norm)}; {message}",
            "timestamp": int(now), "data": data}
