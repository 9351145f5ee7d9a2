"""Topic names, filters and the product's scheme (MQTT §4.7)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import TopicError
from bridge.topic import (
    Topic,
    TopicFilter,
    TopicScheme,
    _build_device_topic,
    all_devices_filter,
    parse_device_topic,
)
from bridge.transport.base import _refusal, refused_topic


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$aws/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("org/+/device/+/#", "org/o/device/d/callback/mapElementChange", True),
        ("$share/g/org/+/device/+/#", "org/o/device/d/status", True),
        ("a/b", "a/c", False),
    ],
)
def test_filter_matching(flt: str, topic: str, expected: bool) -> None:
    assert TopicFilter(flt).matches(topic) is expected
    assert Topic(topic).matches(flt) is expected


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", "", "$share/g", "$share//a", "a\x00"])
def test_invalid_filters_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        TopicFilter(bad)


@pytest.mark.parametrize("bad", ["a/+", "a/#", ""])
def test_wildcards_refused_in_topic_names(bad: str) -> None:
    with pytest.raises(TopicError):
        Topic(bad)


def test_scheme_builds_and_parses_device_topics() -> None:
    scheme = TopicScheme("acme", prefix="prod")
    topic = scheme.device("SN1", "callback/notifySwitchMap")
    assert str(topic) == "prod/org/acme/device/SN1/callback/notifySwitchMap"
    addr = parse_device_topic(str(topic), "prod/")
    assert (addr.org_id, addr.device_id) == ("acme", "SN1")
    assert addr.channel == "callback/notifySwitchMap"
    assert all_devices_filter("prod", "g1").value == "$share/g1/prod/org/+/device/+/#"
    with pytest.raises(TopicError):
        scheme.device("bad/sn", "status")
    with pytest.raises(TopicError):
        parse_device_topic("org/acme/status")
    for wild in ("org/a+b/device/gw/telemetry", "org/a/device/#/status", "org/a/device/b/c/+"):
        with pytest.raises(TopicError):  # a name no TopicScheme builds
            parse_device_topic(wild)


_SEGMENT = st.text(alphabet=st.sampled_from("ab/+#\x00\ufffe é\ud800"), max_size=6) | st.text(
    max_size=300)


def _outcome(build: Callable[[], object]) -> object:
    try:
        return str(build())
    except TopicError as exc:
        return ("refused", exc.reason)


@settings(max_examples=300, deadline=None)
@given(device=_SEGMENT, channel=_SEGMENT)
def test_remembered_topics_and_refusals_are_what_a_fresh_check_says(
        device: str, channel: str) -> None:
    """Device topics and publish refusals are remembered (bounded); asked twice, each
    answer is the one a fresh build or check gives, refusals included."""
    scheme = TopicScheme("acme", prefix="prod")
    fresh = _outcome(lambda: _build_device_topic(scheme.prefix, "acme", device, channel))
    for _ in range(2):
        assert _outcome(lambda: scheme.device(device, channel)) == fresh
        topic = f"prod/org/acme/device/{device}/{channel}"
        refused = refused_topic(topic)
        assert (refused and refused.reason) == _refusal(topic)
