"""Robot tasks: the task messages of a batch -> one row per (robot, task), newest state.

Pure, like rows.py: values are cut to the columns' sizes so no task can make the
database refuse the batch it travels in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from callback_server.store.rows import Item, key, robot_time, text, when
from callback_server.store.schema import TASKS

__all__ = ["task_rows"]

_SIZES = {c.name: c.size for c in TASKS.columns}


def task_rows(items: Sequence[Item], now: float) -> list[tuple[Any, ...]]:
    """Rows of ``robot_tasks`` (column order of TASKS) for the batch's task messages: per
    task the newest by robot time; a task with neither id nor name and time is skipped."""
    newest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    for item in items:
        env = item[1] if isinstance(item, tuple) else item
        if env.channel != "task":
            continue
        data = env.data
        task_id = text(data.get("task_id"), _SIZES["task_id"])
        started = robot_time(data.get("task_time"))
        name = text(data.get("task_name"), _SIZES["task_name"])
        if task_id:
            task_key = key(task_id, _SIZES["task_key"])
        elif name and started is not None:
            task_key = key(f"{name}@{started:.0f}", _SIZES["task_key"])
        else:
            continue
        sn, org = key(env.device, _SIZES["robot_sn"]), key(env.org, _SIZES["org_id"])
        ts = robot_time(env.ts)
        held = newest.get((org, sn, task_key))
        if held is not None and (held[8] or 0) > (ts or 0):
            continue
        newest[(org, sn, task_key)] = (
            sn, task_key, org, task_id, name,
            text(data.get("task_status"), _SIZES["task_status"]), started,
            text(data.get("remark"), _SIZES["remark"]), ts, when(now))
    return [newest[k] for k in sorted(newest)]
