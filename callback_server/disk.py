"""Free space where the callback server keeps its files: the SQLite database's
filesystem (when the store is SQLite) and its data directory.

The SQLite default lives on the server's own disk; when that fills, writes fail and
every message is held or refused, so the room left is shown before that (a metric and
``/health``), the cloud's counterpart of the gateway's outbox free space.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where the server keeps its files by default (the SQLite default, keys written there).
DATA_DIR = Path("data")


def free_bytes(path: Path) -> int | None:
    """Free space for us on the filesystem holding ``path`` (None if it cannot be read)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def watched(database_url: str, data_dir: Path = DATA_DIR) -> dict[str, Path]:
    """What to watch, by name: ``database`` (the SQLite file's directory; not for MySQL
    or an in-memory database) and ``data`` (``data_dir``, else the working directory)."""
    paths = {"data": data_dir if data_dir.is_dir() else Path.cwd()}
    if database_url.startswith("sqlite"):
        file = database_url.split("://", 1)[1][1:] if "://" in database_url else ""
        if file and file != ":memory:" and "mode=memory" not in file:
            paths["database"] = Path(file.split("?", 1)[0]).parent
    return paths


def free_space(paths: dict[str, Path]) -> dict[str, int | None]:
    """Free bytes by name of ``watched`` paths."""
    return {name: free_bytes(path) for name, path in paths.items()}
