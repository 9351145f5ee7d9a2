"""What the edge's outbox writes to its disk a callback, at a trickle.

``python -m bench.outbox_disk [--callbacks 200] [--bytes 600] [--spacing 0.005]``: the
outbox and its publisher on the in-process broker, callbacks one at a time, each
acknowledged before the next comes (what most gateways see most of the time): commits
(each one an fsync of the WAL) and bytes written to the WAL a callback. Counted, not
timed, so a noisy host does not blur it; the WAL's autocheckpoint is off for the run,
so its growth is everything the callbacks wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import tempfile
import uuid
from pathlib import Path

from bridge.outbox import Outbox
from bridge.transport import MqttSettings
from bridge.transport.memory import MemoryBroker, MemoryTransport
from edge_agent.publisher import OutboxPublisher

#: A WAL frame: one page and its 24-byte header.
PAGE = 4096
FRAME = PAGE + 24


class _Unchecked(Outbox):
    """The outbox with its WAL never checkpointed: the WAL's growth is what was written."""

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn


async def measure(callbacks: int, size: int, spacing: float) -> tuple[float, float]:
    """(commits, WAL KiB) a callback."""
    with tempfile.TemporaryDirectory(prefix="bench-outbox-disk-") as tmp:
        name = f"disk-{uuid.uuid4().hex[:8]}"
        MemoryBroker.named(name)
        wal = Path(tmp) / "outbox.db-wal"
        delivered: asyncio.Queue[object] = asyncio.Queue()
        watcher = MemoryTransport(MqttSettings.from_url(f"mqtt://{name}", client_id="watch"))
        watcher.message_handler = delivered.put_nowait
        async with _Unchecked(Path(tmp) / "outbox.db") as outbox, watcher:
            await watcher.subscribe("org/#", qos=1)
            transport = MemoryTransport(MqttSettings.from_url(f"mqtt://{name}", client_id="gw"))
            async with transport:
                publisher = OutboxPublisher(outbox, transport)
                task = asyncio.create_task(publisher.run(), name="publisher")
                await outbox.put("org/o/device/R0/power", b"{}")  # the tables' first pages
                await publisher.wait_drained()
                await delivered.get()
                size0, commits0 = wal.stat().st_size, outbox.commits
                for i in range(callbacks):
                    robot = f"R{i % 50}"
                    payload = os.urandom(size // 2).hex().encode()  # incompressible text
                    await outbox.put(f"org/o/device/{robot}/power", payload,
                                     compact_key=f"power:{robot}", dedup_keys=[os.urandom(24)])
                    await delivered.get()  # the broker has it: its PUBACK is on its way
                    await asyncio.sleep(spacing)  # the trickle's spacing
                await publisher.wait_drained()
                written = wal.stat().st_size - size0
                commits = outbox.commits - commits0
                task.cancel()
                if publisher.published != callbacks + 1:
                    raise RuntimeError(f"{publisher.published} of {callbacks + 1} acknowledged")
    return commits / callbacks, written / callbacks / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callbacks", type=int, default=200)
    parser.add_argument("--bytes", type=int, default=600, help="each callback's payload")
    parser.add_argument("--spacing", type=float, default=0.005,
                        help="seconds between a PUBACK and the next callback")
    args = parser.parse_args()
    commits, kib = asyncio.run(measure(args.callbacks, args.bytes, args.spacing))
    print(f"{args.callbacks} callbacks of {args.bytes} bytes, one at a time: "
          f"{commits:.2f} commits and {kib:.1f} KiB written to the WAL "
          f"({kib * 1024 / FRAME:.1f} pages) a callback")


if __name__ == "__main__":
    main()
