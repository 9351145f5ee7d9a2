"""Unit tests of bridge.pudu.normalize: both sample dialects, every type, every refusal.

Pure logic, so these are fast and exhaustive. The samples are
read from disk; ``PUDU_SAMPLES_DIR`` points them elsewhere. A missing directory or file
fails the test, never skips it: a silently skipped sample test proves nothing.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import InputError
from bridge.http.error_boundary import status_for
from bridge.pudu.normalize import DEFAULT_MAX_SKEW, DOCUMENTED_TYPES, Normalized, normalize

NOW = 1_800_000_000.0  # after every sample's time: none is 'ahead'
HEX32 = re.compile(r"[0-9a-f]{32}")


def samples_dir() -> Path:
    """The Pudu samples: $PUDU_SAMPLES_DIR, else the copy in tests/samples/pudu."""
    override = os.environ.get("PUDU_SAMPLES_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "samples" / "pudu"


def load(name: str) -> dict[str, Any]:
    path = samples_dir() / name
    assert path.is_file(), f"sample {path} is missing (set PUDU_SAMPLES_DIR to the samples)"
    body = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(body, dict)
    return body


def norm(callback_type: str, data: Any, received_at: float = NOW) -> Normalized:
    return normalize({"callback_type": callback_type, "data": data}, received_at=received_at)


# Every documented type (the docs/pudu.md table lists 29 names) in its documented casing.
PUDU_TYPES = [
    "robotStatus", "notifyRobotStatus", "robotErrorWarning", "robotErrorNotice",
    "notifyRobotPower", "notifyRobotPose", "notifyRobotMoveState", "notifyCleanStatus",
    "TASK_STATUS", "robotBinding", "robotUnBinding", "robotActivate", "robotEmergencyRecover",
    "mapElementChange", "notifySwitchMap", "notifyCustomCall", "notifyRobotOrderState",
    "robotDeliveryStatus", "notifyTransportTask", "notifyDeliveryTask", "notifyErrandStatus",
    "notifyLiftingTask", "notifyLiftingStatus", "notifyCruiseTask", "notifyDoorsState",
    "notifyElevatorUtilizeState", "notifyQrCodeContent", "notifyRechargeStatus",
    "notifySwipeCard",
]
CHANNEL = {
    "robotStatus": "status", "notifyRobotStatus": "status",
    "robotErrorWarning": "event", "robotErrorNotice": "event",
    "notifyRobotPower": "power", "notifyRobotPose": "pose", "notifyRobotMoveState": "move",
    "notifyCleanStatus": "task", "TASK_STATUS": "task",
}

# -- samples ------------------------------------------------------------------------------

TASK_DATA = {"task_id": "單測任務id", "task_name": "單測任務名稱", "task_status": "begin",
             "task_time": 1703749732.0, "mac": "08:E9:xxxx"}
# file -> (channel, device_id, ts, data); data is compared exactly (no invented keys).
EXPECTED: dict[str, tuple[str, str, float, dict[str, Any]]] = {
    "notifyRobotPose.json": ("pose", "811064412050012", 1640995800.0,
                             {"x": 15.5, "y": 8.2, "yaw": 90.5, "mac": "B0:0C:9D:59:16:E8"}),
    "notifyRobotPower.json": ("power", "811064412050012", 1640995800.0,
                              {"battery_level": 75, "charge_state": "discharging",
                               "mac": "B0:0C:9D:59:16:E8"}),
    "robotErrorWarning.json": ("event", "811064412050012", 1640995800.0,
                               {"event_id": "vir_1726794796", "event_level": "warning",
                                "event_type": "LostLocalization", "event_detail": "OdomSlip"}),
    "robotStatus.json": ("status", "811064412050012", 1640995800.0, {"status": "online"}),
    "docs/TASK_STATUS__1.json": ("task", "xxxxx", 1703749732.0, TASK_DATA),
    "docs/notifyCleanStatus__1.json": ("task", "xxxxx", 1703749732.0, TASK_DATA),
    "docs/notifyRobotMoveState__1.json": ("move", "OP21321dsffsd", 1764325632.0,
                                          {"move_state": "idle", "mac": "AA:AA:AA:AA:AA:AA"}),
    "docs/notifyRobotPower__1.json": ("power", "TS1732946965085", 1761705083.466,
                                      {"battery_level": 99, "charge_state": "idle",
                                       "mac": "98:A1:4A:38:C4:6D"}),
    "docs/notifyRobotStatus__1.json": ("status", "SN-PD202405000001", 1640995200.0,
                                       {"status": "idle", "battery_level": 85,
                                        "is_charging": False, "charge_state": "idle",
                                        "move_state": "idle", "charge_type": 2,
                                        "remain_time": 0, "mac": "B0:0C:9D:59:16:E8"}),
    "docs/robotBinding__1.json": ("callback/robotBinding", "SV10111....", 1699364274.0, {}),
    "docs/robotErrorNotice__1.json": ("event", "826004C17060045", 1764325632.0, {
        "event_level": "info", "event_type": "EmergencyStop",
        "event_detail": "EmergencyKeyPressed", "battery_level": 58,
        "x": -0.004843229, "y": 4.99104, "yaw": 1.3746479,
        "map_name": "0#0#T600純激光地圖20250815", "task_id": "1222222222222",
        "task_type": "Delivery", "mac": "00:D6:CB:D5:28:01",
    }),
}


def test_samples_dir_holds_exactly_the_expected_files() -> None:
    root = samples_dir()
    assert root.is_dir(), f"Pudu samples directory {root} is missing (set PUDU_SAMPLES_DIR)"
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json"))
    assert found == sorted(EXPECTED), "a sample was added or removed: update EXPECTED"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_normalises_to_expected_channel_device_and_fields(name: str) -> None:
    body = load(name)
    original = copy.deepcopy(body)
    channel, device, ts, data = EXPECTED[name]
    n = normalize(body, received_at=NOW)
    assert n.callback_type == body["callback_type"]
    assert (n.channel, n.device_id) == (channel, device)
    assert n.ts == pytest.approx(ts)
    got = dict(n.data)
    if name == "docs/robotErrorNotice__1.json":  # error_id is "": the id is derived
        assert HEX32.fullmatch(got.pop("event_id"))
    assert got == data
    assert n.raw == original["data"] and body == original  # raw untouched, input unchanged
    expected_key = f"{channel}:{device}" if channel in ("pose", "power") else None
    assert n.compact_key == expected_key


def test_sample_message_ids_are_distinct_and_event_ids_come_from_error_id() -> None:
    results = {name: normalize(load(name), received_at=NOW) for name in EXPECTED}
    assert len({n.message_id for n in results.values()}) == len(results)
    assert results["robotErrorWarning.json"].message_id.startswith("evt-")
    notice = results["docs/robotErrorNotice__1.json"]
    assert HEX32.fullmatch(notice.message_id)  # empty error_id: hash of the body


# -- types and channels ---------------------------------------------------------------------


def test_documented_type_list_matches_pudu_md() -> None:
    assert sorted(DOCUMENTED_TYPES) == sorted(PUDU_TYPES)
    assert len(set(PUDU_TYPES)) == 29


@pytest.mark.parametrize("ctype", PUDU_TYPES)
def test_every_documented_type_is_accepted(ctype: str) -> None:
    n = norm(ctype, {"sn": "R1", "timestamp": 1700000001})
    assert n.callback_type == ctype and n.device_id == "R1" and n.ts == 1700000001.0
    assert n.channel == CHANNEL.get(ctype, f"callback/{ctype}")
    if n.channel.startswith("callback/"):
        assert n.data == {}


@pytest.mark.parametrize("ctype", PUDU_TYPES)
def test_callback_type_is_case_insensitive_and_reported_canonically(ctype: str) -> None:
    for sent in (ctype.lower(), ctype.upper(), f" {ctype} "):
        n = norm(sent, {"sn": "R1"})
        assert n.callback_type == ctype
        assert n.channel == CHANNEL.get(ctype, f"callback/{ctype}")


def test_unknown_type_is_forwarded_raw_on_its_own_channel() -> None:
    data = {"sn": "R9", "anything": {"nested": [1, 2]}, "timestamp": 1700000002}
    n = norm("notifyBrandNew-v2.x", data)
    assert n.callback_type == "notifyBrandNew-v2.x"
    assert (n.channel, n.device_id, n.data, n.raw) == ("callback/notifyBrandNew-v2.x", "R9",
                                                       {}, data)
    assert n.ts == 1700000002.0 and n.compact_key is None


def test_shop_level_callbacks_without_sn_have_no_device() -> None:
    n = norm("mapElementChange", {"shop_id": 1001, "map_name": "F1"})
    assert (n.channel, n.device_id, n.data) == ("callback/mapElementChange", None, {})
    assert n.ts == NOW
    assert norm("somethingShopWide", {"shop_id": 1}).device_id is None


def test_unknown_type_with_mistyped_timestamp_is_still_forwarded() -> None:
    # Nothing in a callback/* body is interpreted, so nothing in it may refuse the body.
    assert norm("notifyWhatever", {"sn": "R1", "timestamp": "yesterday"}).ts == NOW


# -- field normalisation --------------------------------------------------------------------


def test_status_values_lower_cased_numbers_coerced_and_flags_read() -> None:
    n = norm("notifyRobotStatus", {
        "sn": "R1", "run_state": "BUSY", "battery": "75", "is_charging": 1,
        "move_state": "Moving", "charge_stage": "CHARGING", "charge_type": "1",
        "remain_time": 3600.0,
    })
    assert n.data == {"status": "busy", "battery_level": 75, "is_charging": True,
                      "move_state": "moving", "charge_state": "charging", "charge_type": 1,
                      "remain_time": 3600}


@pytest.mark.parametrize(("given", "expected"), [
    (1, True), (-1, False), (0, False), (True, True), (False, False),
    ("1", True), ("-1", False), ("TRUE", True), ("false", False),
])
def test_is_charging_accepts_pudu_and_boolean_forms(given: Any, expected: bool) -> None:
    assert norm("notifyRobotStatus", {"sn": "R1", "is_charging": given}).data == {
        "is_charging": expected}


def test_robot_status_run_status_upper_or_lower() -> None:
    assert norm("robotStatus", {"sn": "R1", "run_status": "OFFLINE"}).data == {
        "status": "offline"}
    assert norm("ROBOTSTATUS", {"sn": "R1", "run_status": "online"}).data == {
        "status": "online"}


def test_charge_state_is_an_alias_of_charge_stage_which_wins() -> None:
    assert norm("notifyRobotPower", {"sn": "R", "charge_state": "Charge_Full"}).data == {
        "charge_state": "charge_full"}
    both = {"sn": "R", "charge_stage": "CHARGING", "charge_state": "idle"}
    assert norm("notifyRobotPower", both).data == {"charge_state": "charging"}
    # An open set: values never seen before pass through.
    live = {"sn": "R", "power": 10, "charge_stage": "STOP_CHARGE_USE_PILE"}
    assert norm("notifyRobotPower", live).data == {"battery_level": 10,
                                                   "charge_state": "stop_charge_use_pile"}


def test_pose_floats_with_optional_z() -> None:
    n = norm("notifyRobotPose", {"sn": "R", "x": "1.5", "y": 2, "yaw": -3.25, "z": 4})
    assert n.data == {"x": 1.5, "y": 2.0, "yaw": -3.25, "z": 4.0}
    assert all(isinstance(v, float) for v in n.data.values())
    assert norm("notifyRobotPose", {"sn": "R", "x": 0, "y": 0}).data == {"x": 0.0, "y": 0.0}


def test_move_state_lower_cased() -> None:
    assert norm("notifyRobotMoveState", {"sn": "R", "state": "STUCK"}).data == {
        "move_state": "stuck"}


def test_task_time_in_ms_is_converted_and_all_task_fields_kept() -> None:
    n = norm("notifyCleanStatus", {"sn": "R", "task_id": 42, "task_name": "Lobby",
                                   "status": "Start_Failed", "task_time": 1703749732123,
                                   "remark": "door shut", "task_method": "manual"})
    assert n.data == {"task_id": "42", "task_name": "Lobby", "task_status": "start_failed",
                      "task_time": pytest.approx(1703749732.123), "remark": "door shut",
                      "task_method": "manual"}


def test_missing_and_blank_fields_are_omitted_never_invented() -> None:
    assert norm("notifyRobotStatus", {"sn": "R"}).data == {}
    assert norm("notifyRobotPower", {"sn": "R", "power": None, "charge_stage": "  "}).data == {}
    assert norm("notifyRobotPose", {"sn": "R", "x": ""}).data == {}
    assert norm("TASK_STATUS", {"sn": "R", "remark": ""}).data == {}


def test_mac_is_kept_on_normalised_channels_only() -> None:
    assert norm("notifyRobotMoveState", {"sn": "R", "mac": "AA"}).data == {"mac": "AA"}
    assert norm("robotBinding", {"sn": "R", "mac": "AA"}).data == {}


def test_keys_with_a_stray_trailing_colon_are_read() -> None:
    n = normalize({"callback_type:": "notifyRobotPower",
                   "data:": {"sn:": "R1", "power:": 50}}, received_at=NOW)
    assert (n.device_id, n.data) == ("R1", {"battery_level": 50})
    assert n.raw == {"sn:": "R1", "power:": 50}  # raw keeps what was sent
    # The exact key wins over its colon variant, whatever the order.
    assert norm("notifyRobotPower", {"power:": 1, "power": 2, "sn": "R"}).data == {
        "battery_level": 2}


def test_keys_are_otherwise_compared_as_given() -> None:
    with pytest.raises(InputError) as exc:
        norm("notifyRobotPower", {"SN": "R1", "power": 50})
    assert exc.value.field == "data.sn"


def test_sn_given_as_an_int_is_accepted_as_text() -> None:
    n = norm("notifyRobotPose", {"sn": 811064412050012, "x": 1, "y": 2})
    assert n.device_id == "811064412050012" and n.compact_key == "pose:811064412050012"


# -- timestamps -----------------------------------------------------------------------------


def test_notify_timestamp_in_ms_wins_over_timestamp() -> None:
    data = {"sn": "R", "timestamp": 1761705082, "notify_timestamp": 1761705083466}
    assert norm("notifyRobotPower", data).ts == pytest.approx(1761705083.466)


@pytest.mark.parametrize(("data", "expected"), [
    ({"timestamp": 1700000000}, 1700000000.0),
    ({"timestamp": 1700000000123}, 1700000000.123),  # ms in the seconds field
    ({"timestamp": "1700000000"}, 1700000000.0),
    ({"notify_timestamp": 1700000000}, 1700000000.0),  # seconds in the ms field
    ({"notify_timestamp": 0, "timestamp": 1700000005}, 1700000005.0),
    ({"notify_timestamp": 1700000000123456789}, NOW),  # not ms either: falls through
    ({}, NOW),
])
def test_robot_time_is_seconds(data: dict[str, Any], expected: float) -> None:
    assert norm("notifyRobotPose", {"sn": "R", **data}).ts == pytest.approx(expected)


def test_received_at_in_ms_is_converted_too() -> None:
    assert norm("notifyRobotPose", {"sn": "R"}, received_at=NOW * 1000).ts == pytest.approx(NOW)


# -- events ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("level", "expected"), [
    ("Fatal", "critical"), ("Error", "high"), ("Warning", "warning"), ("Event", "info"),
    ("FATAL", "critical"), ("error", "high"),
    ("CRITICAL", "critical"), ("HIGH", "high"), ("MEDIUM", "medium"), ("WARNING", "warning"),
    ("INFO", "info"), ("critical", "critical"), ("Info", "info"),
    (None, "medium"), ("", "medium"), ("Catastrophic", "medium"),
])
def test_event_level_mapping(level: str | None, expected: str) -> None:
    data: dict[str, Any] = {"sn": "R", "error_id": "e1"}
    if level is not None:
        data["error_level"] = level
    n = norm("robotErrorWarning", data)
    assert n.data["event_level"] == expected
    if level is not None:
        assert n.raw["error_level"] == level  # the original stays in raw


def test_event_id_and_message_id_come_from_error_id() -> None:
    a = norm("robotErrorWarning", {"sn": "R1", "error_id": "vir_1", "error_detail": "x"})
    b = norm("robotErrorNotice", {"sn": "R1", "error_id": "vir_1", "error_detail": "y"})
    other_robot = norm("robotErrorWarning", {"sn": "R2", "error_id": "vir_1"})
    assert a.data["event_id"] == b.data["event_id"] == "vir_1"
    # Same robot, same error id: the same message however it came (idempotent downstream).
    assert a.message_id == b.message_id and a.message_id.startswith("evt-")
    assert HEX32.fullmatch(a.message_id.removeprefix("evt-"))
    assert other_robot.message_id != a.message_id


def test_event_id_is_derived_when_error_id_is_missing_or_empty() -> None:
    base = {"sn": "R1", "error_type": "EmergencyStop", "error_detail": "Key",
            "timestamp": 1764325632}
    first = norm("robotErrorNotice", {**base, "error_id": ""})
    again = norm("robotErrorNotice", {**base, "error_id": ""})
    missing = norm("robotErrorNotice", base)
    assert HEX32.fullmatch(first.data["event_id"])
    assert first.data["event_id"] == again.data["event_id"] == missing.data["event_id"]
    assert not first.message_id.startswith("evt-")
    for change in ({"sn": "R2"}, {"error_type": "Other"}, {"error_detail": "Other"},
                   {"timestamp": 1764325633}):
        changed = norm("robotErrorNotice", {**base, **change})
        assert changed.data["event_id"] != first.data["event_id"], change


def test_an_overlong_error_id_is_hashed_to_fit_the_event_table() -> None:
    n = norm("robotErrorWarning", {"sn": "R", "error_id": "e" * 300})
    assert HEX32.fullmatch(n.data["event_id"])
    assert len(n.message_id) <= 64


def test_error_notice_extend_info_battery_position_and_task() -> None:
    n = norm("robotErrorNotice", {
        "sn": "R1", "error_id": "e9", "error_level": "Error", "error_type": "T",
        "error_detail": "D", "language": "en",
        "extend_info": {"battery": "58", "map_name": "M", "task_id": 7, "task_type": "Clean",
                        "position": {"x": 1, "y": "2.5", "yaw": 0.5}},
    })
    assert n.data == {"event_id": "e9", "event_level": "high", "event_type": "T",
                      "event_detail": "D", "language": "en", "battery_level": 58,
                      "x": 1.0, "y": 2.5, "yaw": 0.5, "map_name": "M", "task_id": "7",
                      "task_type": "Clean"}


def test_error_notice_without_extend_info_or_position() -> None:
    assert norm("robotErrorNotice", {"sn": "R", "error_id": "e", "extend_info": None}).data == {
        "event_id": "e", "event_level": "medium"}
    n = norm("robotErrorNotice", {"sn": "R", "error_id": "e", "extend_info": {"battery": 5}})
    assert n.data == {"event_id": "e", "event_level": "medium", "battery_level": 5}


def test_error_notice_sn_and_mac_may_come_from_extend_info() -> None:
    n = norm("robotErrorNotice", {"error_id": "e",
                                  "extend_info": {"sn": "R7", "mac": "00:D6"}})
    assert (n.device_id, n.data["mac"]) == ("R7", "00:D6")


# -- message ids ----------------------------------------------------------------------------


def test_message_id_is_stable_for_identical_bodies_and_differs_otherwise() -> None:
    data = {"sn": "R1", "x": 1.0, "y": 2.0, "timestamp": 1700000000}
    first = norm("notifyRobotPose", data, received_at=NOW)
    retried = norm("notifyRobotPose", dict(reversed(list(data.items()))), received_at=NOW + 60)
    assert first.message_id == retried.message_id  # key order and arrival time don't matter
    assert HEX32.fullmatch(first.message_id)
    assert norm("notifyrobotpose", data).message_id == first.message_id
    assert norm("notifyRobotPose", {**data, "x": 1.5}).message_id != first.message_id
    assert norm("notifyRobotPose", {**data, "sn": "R2"}).message_id != first.message_id
    assert norm("notifyRobotPower", data).message_id != first.message_id


# -- refusals -------------------------------------------------------------------------------

BAD: list[tuple[str, Any, str | None, int]] = [
    # (case, body, field, status)
    ("list body", [1, 2], None, 400),
    ("string body", "robotStatus", None, 400),
    ("null body", None, None, 400),
    ("no callback_type", {"data": {"sn": "R"}}, "callback_type", 422),
    ("empty callback_type", {"callback_type": " ", "data": {"sn": "R"}}, "callback_type", 422),
    ("int callback_type", {"callback_type": 5, "data": {"sn": "R"}}, "callback_type", 422),
    ("slash in type", {"callback_type": "a/b", "data": {}}, "callback_type", 422),
    ("wildcard in type", {"callback_type": "a+", "data": {}}, "callback_type", 422),
    ("hash in type", {"callback_type": "#", "data": {}}, "callback_type", 422),
    ("dollar in type", {"callback_type": "$SYS", "data": {}}, "callback_type", 422),
    ("long type", {"callback_type": "a" * 65, "data": {}}, "callback_type", 422),
    ("no data", {"callback_type": "robotStatus"}, "data", 422),
    ("null data", {"callback_type": "robotStatus", "data": None}, "data", 422),
    ("list data", {"callback_type": "robotStatus", "data": []}, "data", 422),
    ("string data", {"callback_type": "unknownType", "data": "x"}, "data", 422),
    ("no sn", {"callback_type": "robotStatus", "data": {"run_status": "ONLINE"}},
     "data.sn", 422),
    ("empty sn", {"callback_type": "notifyRobotPose", "data": {"sn": ""}}, "data.sn", 422),
    ("float sn", {"callback_type": "notifyRobotPose", "data": {"sn": 1.5}}, "data.sn", 422),
    ("bool sn", {"callback_type": "notifyRobotPose", "data": {"sn": True}}, "data.sn", 422),
    ("object sn", {"callback_type": "notifyRobotPose", "data": {"sn": {}}}, "data.sn", 422),
    ("slash sn", {"callback_type": "robotStatus", "data": {"sn": "a/b"}}, "data.sn", 422),
    ("plus sn", {"callback_type": "robotStatus", "data": {"sn": "a+"}}, "data.sn", 422),
    ("hash sn", {"callback_type": "robotStatus", "data": {"sn": "#"}}, "data.sn", 422),
    ("nul sn", {"callback_type": "robotStatus", "data": {"sn": "a\x00"}}, "data.sn", 422),
    # Characters Mosquitto answers with a disconnect ("malformed packet"), in a topic level.
    ("newline sn", {"callback_type": "robotStatus", "data": {"sn": "a\nb"}}, "data.sn", 422),
    ("tab sn", {"callback_type": "notifyRobotPose", "data": {"sn": "a\tb"}}, "data.sn", 422),
    ("C1 sn", {"callback_type": "newType", "data": {"sn": "a\x8fb"}}, "data.sn", 422),
    ("noncharacter sn", {"callback_type": "robotStatus", "data": {"sn": "a\ufdd0"}}, "data.sn",
     422),
    ("long sn", {"callback_type": "robotStatus", "data": {"sn": "s" * 129}}, "data.sn", 422),
    ("bad sn on unknown type", {"callback_type": "newType", "data": {"sn": "a/b"}},
     "data.sn", 422),
    ("text battery", {"callback_type": "notifyRobotStatus", "data": {"sn": "R", "battery": "abc"}},
     "data.battery", 422),
    ("bool battery", {"callback_type": "notifyRobotStatus", "data": {"sn": "R", "battery": True}},
     "data.battery", 422),
    ("list battery", {"callback_type": "notifyRobotStatus", "data": {"sn": "R", "battery": [1]}},
     "data.battery", 422),
    ("text power", {"callback_type": "notifyRobotPower", "data": {"sn": "A", "power": "lots"}},
     "data.power", 422),
    ("nan power", {"callback_type": "notifyRobotPower", "data": {"sn": "A", "power": "NaN"}},
     "data.power", 422),
    ("text x", {"callback_type": "notifyRobotPose", "data": {"sn": "R", "x": "left"}},
     "data.x", 422),
    ("bool yaw", {"callback_type": "notifyRobotPose", "data": {"sn": "R", "yaw": False}},
     "data.yaw", 422),
    ("infinite y", {"callback_type": "notifyRobotPose", "data": {"sn": "R", "y": float("inf")}},
     "data.y", 422),
    ("huge int x", {"callback_type": "notifyRobotPose", "data": {"sn": "R", "x": 10**400}},
     "data.x", 422),
    ("text is_charging",
     {"callback_type": "notifyRobotStatus", "data": {"sn": "R", "is_charging": "maybe"}},
     "data.is_charging", 422),
    ("object run_state",
     {"callback_type": "notifyRobotStatus", "data": {"sn": "R", "run_state": {"a": 1}}},
     "data.run_state", 422),
    ("bool state", {"callback_type": "notifyRobotMoveState", "data": {"sn": "R", "state": True}},
     "data.state", 422),
    ("text timestamp",
     {"callback_type": "notifyRobotPose", "data": {"sn": "R", "timestamp": "noon"}},
     "data.timestamp", 422),
    ("text notify_timestamp",
     {"callback_type": "notifyRobotPose", "data": {"sn": "R", "notify_timestamp": "x"}},
     "data.notify_timestamp", 422),
    ("text task_time",
     {"callback_type": "TASK_STATUS", "data": {"sn": "R", "task_time": "later"}},
     "data.task_time", 422),
    ("list extend_info",
     {"callback_type": "robotErrorNotice", "data": {"sn": "R", "extend_info": [1]}},
     "data.extend_info", 422),
    ("text position",
     {"callback_type": "robotErrorNotice", "data": {"sn": "R", "extend_info": {"position": "0"}}},
     "data.extend_info.position", 422),
    ("text extend battery",
     {"callback_type": "robotErrorNotice", "data": {"sn": "R", "extend_info": {"battery": "hi"}}},
     "data.extend_info.battery", 422),
    ("text position x",
     {"callback_type": "robotErrorNotice",
      "data": {"sn": "R", "extend_info": {"position": {"x": "far"}}}},
     "data.extend_info.position.x", 422),
    ("object mac", {"callback_type": "notifyRobotPose", "data": {"sn": "R", "mac": {}}},
     "data.mac", 422),
]


@pytest.mark.parametrize(("body", "field", "status"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_raises_input_error_naming_the_field(
    body: Any, field: str | None, status: int
) -> None:
    with pytest.raises(InputError) as exc:
        normalize(body, received_at=NOW)
    assert status_for(exc.value) == status
    assert exc.value.field == field
    if field is not None:
        assert field in exc.value.message
    else:
        assert "object" in exc.value.message


# -- properties -----------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=12)
            | st.floats(allow_nan=True, allow_infinity=True))
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                 inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from([
    "sn", "sn:", "mac", "battery", "is_charging", "run_state", "run_status", "power",
    "charge_stage", "charge_state", "x", "y", "z", "yaw", "state", "status", "task_time",
    "task_id", "error_id", "error_level", "error_type", "extend_info", "timestamp",
    "notify_timestamp",
]) | st.text(max_size=6)
_types = st.sampled_from(PUDU_TYPES) | st.text(max_size=10) | _json
_bodies = st.fixed_dictionaries(
    {"callback_type": _types, "data": st.dictionaries(_keys, _json, max_size=8) | _json}
) | _json

@settings(max_examples=400, deadline=None)
@given(body=_bodies)
def test_normalize_raises_only_input_error(body: Any) -> None:
    try:
        n = normalize(body, received_at=NOW)
    except InputError as exc:
        assert status_for(exc) in (400, 422)
        return
    assert n.channel in CHANNEL.values() or n.channel.startswith("callback/")
    assert n.ts > 0 and n.message_id

@settings(max_examples=200, deadline=None)
@given(ms=st.integers(min_value=100_000_000_001, max_value=99_999_999_999_999),
       key=st.sampled_from(["timestamp", "notify_timestamp"]),
       ctype=st.sampled_from(PUDU_TYPES))
def test_millisecond_timestamps_become_seconds(ms: int, key: str, ctype: str) -> None:
    n = norm(ctype, {"sn": "R", key: ms})
    assert n.ts < 1e11
    if ms / 1000 - NOW <= DEFAULT_MAX_SKEW:
        assert n.ts == pytest.approx(ms / 1000)
    else:  # too far ahead of the gateway clock to order by
        assert (n.ts, n.skewed) == (NOW, True)
