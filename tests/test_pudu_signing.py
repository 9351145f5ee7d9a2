"""Pudu request signing against the digest's three worked examples (docs/pudu.md, "API 2")."""

from __future__ import annotations

import calendar
import time

from edge_agent.pudu import signing

KEY, SECRET = "demo-app-key", "demo-app-secret"
DATE = "Wed, 01 Jan 2025 00:00:00 GMT"
NOW = calendar.timegm(time.strptime("2025-01-01 00:00:00", "%Y-%m-%d %H:%M:%S"))


def _sig(method: str, path: str, query: str = "", body: bytes | None = None) -> str:
    headers = signing.signed_headers(key=KEY, secret=SECRET, method=method, path=path,
                                     query=query, body=body, now=NOW)
    assert headers["x-date"] == DATE
    return signing.parse_authorization(headers["Authorization"])["signature"]


def test_x_date_is_rfc1123_gmt() -> None:
    assert signing.x_date(NOW) == DATE


def test_get_status_example() -> None:
    query = signing.encode_query({"sn": "PD2024TEST0001"})
    assert query == "sn=PD2024TEST0001"
    assert _sig("GET", "/pudu-entry/open-platform-service/v2/status/get_by_sn", query) == \
        "fhIbUehf3YWDCgGZ033w1dZn36c="


def test_get_error_log_example_is_sent_encoded_and_signed_decoded() -> None:
    params = {"start_time": 1735689600, "end_time": 1735776000, "shop_id": 12345,
              "limit": 20, "offset": 0, "error_levels": "Error,Warning"}
    query = signing.encode_query(params)
    assert query == ("end_time=1735776000&error_levels=Error%2CWarning&limit=20&offset=0"
                     "&shop_id=12345&start_time=1735689600")
    path = "/pudu-entry/data-board/v1/log/error/query_list"
    assert _sig("GET", path, query) == "raW7pEelP8RBUhW2t5AT9P9mqD8="
    # a list value keeps its comma literal and signs the same
    listed = signing.encode_query({**params, "error_levels": ["Error", "Warning"]})
    assert listed == query.replace("%2C", ",")
    assert _sig("GET", path, listed) == "raW7pEelP8RBUhW2t5AT9P9mqD8="


def test_post_position_command_example() -> None:
    body = signing.body_bytes({"sn": "PD2024TEST0001", "payload": {"interval": 1, "times": 10}})
    assert body == b'{"sn":"PD2024TEST0001","payload":{"interval":1,"times":10}}'
    assert signing.content_md5(body) == "MGY0NmVkODExMWNjYmE1YTY3MmFiNGJlM2M5ZDkxNmM="
    assert _sig("POST", "/pudu-entry/open-platform-service/v1/position_command", body=body) \
        == "AOsHv7aH/8xaIHM+3VrugiPekds="


def test_query_encoding_rules() -> None:
    assert signing.encode_query({"b": "a b/c", "a": "", "c": None, "d": ["x y", "z"]}) == \
        "a&b=a%20b%2Fc&c&d=x%20y,z"
    assert signing.content_md5(None) == "" and signing.content_md5(b"") == ""
