"""Topics, topic filters and the product's topic scheme.

Rules follow MQTT 3.1.1 §4.7 / MQTT 5 §4.7: levels split on ``/``; ``+`` matches one
level, ``#`` the rest (and the parent level); wildcards may not appear in topic
names; topics starting with ``$`` are not matched by a filter starting with a wildcard.

Characters: a topic is UTF-8 without U+0000 (§1.5.4), and brokers refuse more than the
MUST of the spec: Mosquitto disconnects a client ("malformed packet") whose topic holds a
control character (U+0001-U+001F, U+007F-U+009F, tab and newline included) or a
noncharacter (U+FDD0-U+FDEF, U+xFFFE, U+xFFFF), measured. A publish the broker answers
by disconnecting is resent after the reconnect and disconnects again, for ever, so such
a topic is refused here, before anything is queued.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from bridge.errors import TopicError

MAX_TOPIC_BYTES = 65535
#: AWS IoT Core's topic limit, here (not in the awsiot transport) so checks can read it on
#: a gateway without awscrt installed.
AWS_MAX_TOPIC_BYTES = 256
#: The longest robot sn the product accepts, in UTF-8 bytes: the sn is one level of a topic
#: AWS IoT Core caps at 256 bytes. Every own table's robot_sn is this many characters wide
#: (docs/storage.md), so an accepted sn is always stored and found under itself.
MAX_SN_BYTES = 128

#: Channels a robot device publishes on.
ROBOT_CHANNELS = ("status", "event", "pose", "power", "move", "task")
#: The channel of each callback type that has one (docs/design-contracts.md, "Pudu
#: webhook"); every other type, documented or not, travels raw on ``callback/{type}``.
CHANNEL_OF_TYPE: dict[str, str] = {
    "robotStatus": "status",
    "notifyRobotStatus": "status",
    "robotErrorWarning": "event",
    "robotErrorNotice": "event",
    "notifyRobotPower": "power",
    "notifyRobotPose": "pose",
    "notifyRobotMoveState": "move",
    "notifyCleanStatus": "task",
    "TASK_STATUS": "task",
}


def channel_for(callback_type: str) -> str:
    """The channel a callback type is published on."""
    return CHANNEL_OF_TYPE.get(callback_type, f"callback/{callback_type}")


def normalize_prefix(prefix: str) -> str:
    """A topic prefix as used in front of ``org/``: empty, or ending in exactly one ``/``."""
    return prefix.rstrip("/") + "/" if prefix.strip("/") else ""


#: Channels of the gateway device itself (``poll``: the Pudu cloud poller's run records;
#: ``batch``: a frame of robot envelopes sent during a drain, bridge/frames.py).
#: Gateway traffic is told apart by these, never by comparing device and gateway ids.
GATEWAY_CHANNELS = ("command", "response", "presence", "telemetry", "poll", "batch")
#: The gateway channel carrying batch frames (``BATCH_FRAMES=on``).
BATCH_CHANNEL = "batch"


_REFUSED_CHARACTERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(1, 17))
    + "]")


def refused_character(value: str) -> str | None:
    """The first character brokers refuse in a topic, as ``U+XXXX``; None if there is none
    (a lone surrogate is caught by the UTF-8 check)."""
    found = _REFUSED_CHARACTERS.search(value)
    return None if found is None else f"U+{ord(found.group()):04X}"


def _check_common(value: str) -> None:
    if not value:
        raise TopicError(value, "empty")
    if (char := refused_character(value)) is not None:
        raise TopicError(value, f"contains {char}: control characters and noncharacters "
                         "are refused by MQTT brokers")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") from JSON: not UTF-8 (§1.5.4)
        raise TopicError(value, "not valid UTF-8") from None
    if size > MAX_TOPIC_BYTES:
        raise TopicError(value, "longer than 65535 bytes")


@dataclass(frozen=True, slots=True)
class Topic:
    """A concrete topic name (no wildcards)."""

    value: str

    def __post_init__(self) -> None:
        _check_common(self.value)
        if "+" in self.value or "#" in self.value:
            raise TopicError(self.value, "wildcards are not allowed in a topic name")

    def __str__(self) -> str:
        return self.value

    def matches(self, flt: TopicFilter | str) -> bool:
        """True if this topic matches ``flt``."""
        f = flt if isinstance(flt, TopicFilter) else TopicFilter(flt)
        return f.matches(self)


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A subscription filter, possibly with ``+``/``#`` wildcards or a ``$share`` prefix."""

    value: str

    def __post_init__(self) -> None:
        _check_common(self.value)
        levels = self.value.split("/")
        if levels[0] == "$share":
            # MQTT 5 §4.8.2: $share/{ShareName}/{filter}; ShareName has no wildcards.
            if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
                raise TopicError(self.value, "shared subscription needs $share/<group>/<filter>")
            levels = levels[2:]
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise TopicError(self.value, "'#' must be the last level on its own")
            if "+" in level and level != "+":
                raise TopicError(self.value, "'+' must occupy a whole level")

    def __str__(self) -> str:
        return self.value

    @property
    def share_group(self) -> str | None:
        levels = self.value.split("/")
        return levels[1] if levels[0] == "$share" else None

    @property
    def base(self) -> str:
        """The filter without any ``$share/{group}/`` prefix."""
        levels = self.value.split("/")
        return "/".join(levels[2:]) if levels[0] == "$share" else self.value

    def matches(self, topic: Topic | str) -> bool:
        """MQTT matching of a topic name against this filter."""
        name = topic.value if isinstance(topic, Topic) else topic
        flt = self.base.split("/")
        parts = name.split("/")
        # §4.7.2: a filter starting with a wildcard does not match a $-topic.
        if name.startswith("$") and flt[0] in ("+", "#"):
            return False
        for i, level in enumerate(flt):
            if level == "#":
                return True
            if i >= len(parts):
                return False
            if level != "+" and level != parts[i]:
                return False
        # "a/#" also matches "a" (handled above); "a/+" does not match "a/b/c".
        return len(parts) == len(flt)


def _check_segment(name: str, value: str) -> str:
    if not value or any(c in value for c in "/+#") or refused_character(value) is not None:
        raise TopicError(value, f"{name} must be non-empty and contain no '/', '+', '#', "
                         "control characters or noncharacters")
    return value


@dataclass(frozen=True, slots=True)
class TopicScheme:
    """``{prefix}org/{org}/device/{device}/{channel}``: the product's topic layout."""

    org_id: str
    prefix: str = ""

    def __post_init__(self) -> None:
        _check_segment("org_id", self.org_id)
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix))

    def device(self, device_id: str, channel: str) -> Topic:
        """The topic for ``channel`` of ``device_id`` (``channel`` may hold a '/')."""
        build = _device_topic if len(device_id) + len(channel) <= REMEMBERED_TOPIC_CHARS \
            else _build_device_topic
        return build(self.prefix, self.org_id, device_id, channel)

    def alerts(self) -> Topic:
        """The org-level topic alert transitions are published on (QoS 1, not retained)."""
        return Topic(f"{self.prefix}org/{self.org_id}/alerts")


@functools.lru_cache(maxsize=4096)
def scheme_of(org_id: str, prefix: str = "") -> TopicScheme:
    """``TopicScheme(org_id, prefix)`` made once per org: a server placing each incoming
    envelope under its org's topics checked the org and the prefix on every one."""
    return TopicScheme(org_id, prefix)


def _build_device_topic(prefix: str, org_id: str, device_id: str, channel: str) -> Topic:
    _check_segment("device_id", device_id)
    for part in channel.split("/"):
        _check_segment("channel", part)
    return Topic(f"{prefix}org/{org_id}/device/{device_id}/{channel}")


#: Built and checked once per robot and channel while they stay among the recent 8,192
#: (the scans of each accepted callback's topic were ~6 % of the edge's loop thread); a
#: refusal raises each time.
_device_topic = functools.lru_cache(maxsize=8192)(_build_device_topic)


def all_devices_filter(prefix: str = "", share_group: str | None = None) -> TopicFilter:
    """``org/+/device/+/#`` under ``prefix``, shared when ``share_group`` is given."""
    base = f"{normalize_prefix(prefix)}org/+/device/+/#"
    return TopicFilter(f"$share/{share_group}/{base}" if share_group else base)


def every_device_channel(prefix: str, channel: str) -> TopicFilter:
    """``org/+/device/+/{channel}`` under ``prefix`` (e.g. every gateway's responses)."""
    return TopicFilter(f"{normalize_prefix(prefix)}org/+/device/+/{channel}")


def org_root(prefix: str, org_id: str | None = None) -> str:
    """``{prefix}org/`` or ``{prefix}org/{org_id}/``: what the REST proxy confines to."""
    root = f"{normalize_prefix(prefix)}org/"
    return f"{root}{_check_segment('org_id', org_id)}/" if org_id is not None else root


@dataclass(frozen=True, slots=True)
class DeviceAddress:
    """The parts of a topic in the product's scheme."""

    org_id: str
    device_id: str
    channel: str


#: Topics no longer than this are remembered once parsed, built or checked (a consumer
#: sees the same few thousand devices' topics over and over: parsing was ~5 % of its
#: CPU). Longer ones, and refused ones, are handled each time: what a cache may hold
#: stays bounded (8,192 of them, a few MiB whatever a hostile sender names).
REMEMBERED_TOPIC_CHARS = 256


def parse_device_topic(topic: str, prefix: str = "") -> DeviceAddress:
    """Split ``{prefix}org/{org}/device/{device}/{channel...}``; TopicError otherwise."""
    if len(topic) <= REMEMBERED_TOPIC_CHARS:
        return _parse_remembered(topic, prefix)
    return _parse_device_topic(topic, prefix)


@functools.lru_cache(maxsize=8192)
def _parse_remembered(topic: str, prefix: str) -> DeviceAddress:
    return _parse_device_topic(topic, prefix)


def _parse_device_topic(topic: str, prefix: str) -> DeviceAddress:
    prefix = normalize_prefix(prefix)
    if not topic.startswith(prefix):
        raise TopicError(topic, f"does not start with prefix {prefix!r}")
    parts = topic[len(prefix):].split("/")
    if len(parts) < 5 or parts[0] != "org" or parts[2] != "device" or not all(parts[:5]):
        raise TopicError(topic, "not of the form org/{org}/device/{device}/{channel}")
    if any(c in topic for c in "+#") or refused_character(topic) is not None:
        raise TopicError(topic, "a topic's levels may not contain '+', '#', control "
                         "characters or noncharacters (a name no TopicScheme could build)")
    return DeviceAddress(parts[1], parts[3], "/".join(parts[4:]))
