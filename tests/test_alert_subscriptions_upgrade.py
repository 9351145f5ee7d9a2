"""An upgrade from the version with alert subscription tables of their own: the rows
become webhooks of style ``alert`` (one store, one delivery worker), the
``/alert-subscriptions`` view shows them as before, and a second run moves nothing twice;
and retention of the one delivery log they share with the event webhooks."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from callback_server.alerts.alert_subscriptions import AlertSubscriptions
from callback_server.retention import Retention
from callback_server.store import open_store
from callback_server.store.protocol import SqlAccess
from callback_server.store.schema import (
    ALERT_DELIVERIES,
    ALERT_DELIVERIES_TABLE,
    ALERT_SUBSCRIPTIONS,
    ALERT_SUBSCRIPTIONS_TABLE,
    WEBHOOK_DELIVERIES,
    WEBHOOK_DELIVERIES_TABLE,
    WEBHOOKS,
    WEBHOOKS_TABLE,
    TableSpec,
)
from callback_server.store.sql import SqlStore
from callback_server.webhooks.store import WebhookStore
from tests.support.dbutil import scratch_mysql_database

pytestmark = pytest.mark.integration

#: The webhook tables as the version before this one declared them.
OLD_WEBHOOKS = TableSpec(columns=WEBHOOKS.columns[:7], key=("id",))
OLD_DELIVERIES = TableSpec(columns=WEBHOOK_DELIVERIES.columns[:9], key=("id",))
SUBS = [("asub_0001", "https://a.example/hook", "s" * 32, json.dumps(["robot_fault"]),
         json.dumps(["acme"]), "admin", 1000.0),
        ("asub_0002", "https://b.example/hook", "t" * 32, None, json.dumps(["*"]), None,
         1001.0)]
SENT = [(1, "asub_0001", "alert1", "opened", "tr1", 1, "failed", 1010.0),
        (2, "asub_0001", "alert1", "opened", "tr1", 2, "delivered", 1011.0),
        (3, "asub_0002", "alert2", "resolved", "tr2", 1, "gave_up", 1012.0)]


@pytest.fixture(params=["sqlite", "mysql"])
async def sql(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[SqlStore]:
    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'cb.db'}" if request.param == "sqlite"
               else stack.enter_context(scratch_mysql_database()))
        async with open_store(url) as store:
            yield store


async def legacy(sql: SqlAccess, *, old_webhook_tables: bool) -> None:
    """What an earlier version left: subscription rows, their log, and (optionally) the
    webhook tables without the columns added since, with an event webhook's attempt."""
    await sql.ready()
    d, backend = sql.dialect, sql.backend
    statements: list[tuple[str, Any]] = [
        (d.insert(ALERT_SUBSCRIPTIONS_TABLE, ALERT_SUBSCRIPTIONS.names), SUBS),
        (d.insert(ALERT_DELIVERIES_TABLE, ALERT_DELIVERIES.names), SENT)]
    if old_webhook_tables:
        await backend.transaction([(d.create_table(WEBHOOKS_TABLE, OLD_WEBHOOKS), None)])
        await backend.transaction([(d.create_table(WEBHOOK_DELIVERIES_TABLE, OLD_DELIVERIES),
                                    None)])
        statements += [
            (d.insert(WEBHOOKS_TABLE, OLD_WEBHOOKS.names),
             [("wh_1", "https://c.example", "u" * 32, '["robot.error"]', '["acme"]', None,
               900.0)]),
            (d.insert(WEBHOOK_DELIVERIES_TABLE, OLD_DELIVERIES.names),
             [(1, "wh_1", "evt_1", "robot.error", 1, 204, 3.5, "delivered", 950.0)])]
    await backend.transaction(statements)


async def test_alert_subscriptions_and_their_log_move_into_the_webhook_tables(
        sql: SqlAccess) -> None:
    await legacy(sql, old_webhook_tables=True)
    hooks = WebhookStore(sql)
    view = AlertSubscriptions(hooks, lambda: None)

    subs = {s.id: s for s in await view.subscriptions()}
    assert subs["asub_0001"].public() | {"created_at": None} == {
        "id": "asub_0001", "url": "https://a.example/hook", "rules": ["robot_fault"],
        "orgs": ["acme"], "created_by": "admin", "created_at": None}
    assert subs["asub_0002"].rules is None and subs["asub_0002"].orgs == ("*",)
    assert subs["asub_0001"].secret == "s" * 32  # receivers keep verifying with it
    # The event webhook of before is still one, and not an alert subscription.
    assert [h.id for h in await hooks.all()] == ["asub_0001", "asub_0002", "wh_1"]
    assert await view.subscription("wh_1") is None

    items, _ = await view.deliveries("asub_0001", limit=10)
    assert [(i["alert_id"], i["transition"], i["transition_id"], i["attempt"], i["outcome"])
            for i in items] == [("alert1", "opened", "tr1", 2, "delivered"),
                                ("alert1", "opened", "tr1", 1, "failed")]
    (event,), _ = await hooks.deliveries("wh_1", limit=10)
    assert (event["event"], event["status"], event["outcome"]) == ("robot.error", 204,
                                                                   "delivered")
    # The old tables are emptied in the same transaction.
    for table in (ALERT_SUBSCRIPTIONS_TABLE, ALERT_DELIVERIES_TABLE):
        assert await sql.backend.fetch(f"SELECT * FROM {sql.dialect.quote(table)}") == []

    # A new attempt ranks above the moved ones (newest first, as the log always was).
    await hooks.record("asub_0002", "tr3", "alert.acknowledged", 1, 200, 1.0, "delivered",
                       2000.0, "alert2")
    items, _ = await view.deliveries("asub_0002", limit=10)
    assert [(i["transition"], i["alert_id"]) for i in items] == [("acknowledged", "alert2"),
                                                                 ("resolved", "alert2")]
    # Paged: the cursor runs through moved rows as through new ones.
    first, cursor = await view.deliveries("asub_0002", limit=1)
    assert cursor is not None
    rest, end = await view.deliveries("asub_0002", limit=1, after=int(cursor[0]))
    assert [first[0]["transition"], rest[0]["transition"]] == ["acknowledged", "resolved"]
    assert end is None


async def test_a_second_move_of_the_same_rows_inserts_nothing_twice(sql: SqlAccess) -> None:
    """A crash after the move, or a second replica reading the old rows before the first
    replica's commit: moving the same rows again leaves one copy of each."""
    await legacy(sql, old_webhook_tables=False)
    await AlertSubscriptions(WebhookStore(sql), lambda: None).subscriptions()
    await legacy(sql, old_webhook_tables=False)  # the same rows, back in the old tables
    view = AlertSubscriptions(WebhookStore(sql), lambda: None)
    assert [s.id for s in await view.subscriptions()] == ["asub_0001", "asub_0002"]
    items, _ = await view.deliveries("asub_0001", limit=10)
    assert [i["attempt"] for i in items] == [2, 1]


async def test_retention_prunes_delivery_attempts_past_their_days(sql: SqlStore) -> None:
    """WEBHOOK_DELIVERY_RETENTION_DAYS: attempts older than the retention go, moved alert
    subscription attempts among them; recent ones and the webhooks themselves stay."""
    await legacy(sql, old_webhook_tables=True)  # attempts of 1970, moved on first use
    hooks = WebhookStore(sql)
    view = AlertSubscriptions(hooks, lambda: None)
    now = time.time()
    await hooks.record("asub_0001", "tr9", "alert.resolved", 1, 200, 2.0, "delivered",
                       now - 86400, "alert1")
    await hooks.record("wh_1", "evt_9", "robot.error", 1, 204, 2.0, "delivered", now, None)
    retention = Retention(sql, {WEBHOOK_DELIVERIES_TABLE: 2.0}, interval=3600,
                          batch=2, pruners={WEBHOOK_DELIVERIES_TABLE: hooks.prune})
    assert await retention.prune_once(now=now) == 4  # three moved, one of wh_1, batches of 2
    items, _ = await view.deliveries("asub_0001", limit=10)
    assert [i["transition_id"] for i in items] == ["tr9"]
    assert [i["event_id"] for i in (await hooks.deliveries("wh_1", limit=10))[0]] == ["evt_9"]
    assert await view.deliveries("asub_0002", limit=10) == ([], None)
    assert len(await hooks.all()) == 3
    # A day later the one-day-old attempt is past two days as well.
    assert await retention.prune_once(now=now + 1.5 * 86400) == 1
    assert retention.pruned == {WEBHOOK_DELIVERIES_TABLE: 5}
