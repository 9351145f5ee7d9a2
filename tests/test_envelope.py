"""The envelope: every way an outside producer can get it wrong is a PayloadError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.envelope import Envelope
from bridge.errors import PayloadError
from tests.support.hostile import FAULT_CLASSES, json_values, valid_envelope
from tests.test_strictjson import strict_loads

fields = st.fixed_dictionaries({}, optional={
    k: json_values for k in ("v", "id", "type", "org", "device", "gateway", "ts",
                             "received_at", "data", "raw", "channel", "notes")})


@given(fields | json_values)
@settings(max_examples=1000)
def test_from_dict_only_ever_raises_payload_error(obj: Any) -> None:
    try:
        env = Envelope.from_dict(obj)
    except PayloadError as exc:
        assert str(exc)
        return
    assert env.v == 1 and env.id and env.org and env.device
    strict_loads(env.to_json())


@pytest.mark.parametrize("fault", sorted(FAULT_CLASSES))
@given(data=st.data())
@settings(max_examples=30)
def test_each_fault_class_is_refused_with_a_payload_error(fault: str, data: st.DataObject
                                                          ) -> None:
    payload = data.draw(FAULT_CLASSES[fault])("acme", "R1", 7)
    if fault == "org or device unlike the topic":
        assert Envelope.from_json(payload).device != "R1" or \
            Envelope.from_json(payload).org != "acme"
        return
    with pytest.raises(PayloadError):
        Envelope.from_json(payload)


def test_round_trip_keeps_notes_and_is_strict_json() -> None:
    env = Envelope.from_json(json.dumps(valid_envelope("o", "d", 1, raw={"x": float("nan")})))
    assert env.raw == {"x": None} and env.notes == ("raw.x: nan is not JSON; null",)
    again = Envelope.from_json(env.to_json())
    assert again == env
    assert strict_loads(env.to_json())["notes"] == ["raw.x: nan is not JSON; null"]


def test_a_nan_built_in_code_is_nulled_and_noted_on_the_way_out() -> None:
    env = Envelope(id="i", type="t", org="o", device="d", gateway="g", ts=1.0,
                   received_at=1.0, data={"x": float("inf")})
    out = strict_loads(env.to_json())
    assert out["data"] == {"x": None} and out["notes"] == ["data.x: inf is not JSON; null"]
    assert env.data == {"x": float("inf")}  # the object itself is not changed


def test_integer_ids_are_taken_as_their_digits() -> None:
    env = Envelope.from_dict(valid_envelope("o", "d", 1, id=42, device=7))
    assert (env.id, env.device) == ("42", "7")
