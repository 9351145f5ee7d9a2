"""The edge's journal (the outbox database's side tables): poll run records page by
keyset, each once, newest first, ties on the start time broken by run id."""

from __future__ import annotations

from pathlib import Path

from edge_agent.journal import Journal


async def test_run_records_page_newest_first_each_once(tmp_path: Path) -> None:
    async with Journal(tmp_path / "outbox.db") as journal:
        # Seven runs, two pairs starting in the same second.
        starts = [100.0, 101.0, 101.0, 102.0, 103.0, 103.0, 104.0]
        for i, started in enumerate(starts):
            await journal.save_run({"run_id": f"r{i}", "started_at": started,
                                    "ended_at": started + 1, "status": "ok"})
        expected = [r["run_id"] for r in sorted(
            ({"run_id": f"r{i}", "started": s} for i, s in enumerate(starts)),
            key=lambda r: (r["started"], r["run_id"]), reverse=True)]
        got: list[str] = []
        after = None
        pages = 0
        while True:
            items, after = await journal.runs(2, after)
            got += [r["run_id"] for r in items]
            pages += 1
            if after is None:
                break
        assert got == expected and pages == 4
