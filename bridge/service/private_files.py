"""Files only the service's own user may read: the outbox, the SQLite database, their WAL.

Under systemd the units set ``UMask=0077``; started any other way the umask is usually
022, and SQLite creates its database 0644 (its ``-wal`` and ``-shm`` files take the mode
of the database file). So the modes are set here explicitly, whatever the umask: the
directories we create 0700, the database file created (or tightened) 0600 before SQLite
opens it, and a ``-wal``/``-shm``/``-journal`` left from before tightened too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def make_private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents 0700; directories that exist are left alone."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to change
        os.chmod(directory, DIR_MODE)  # mkdir's mode is masked by the umask


def prepare_sqlite_file(path: Path) -> None:
    """The database file exists, 0600, before SQLite opens it (an empty file is a new DB)."""
    make_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    for suffix in SQLITE_SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path.with_name(path.name + suffix), FILE_MODE)
