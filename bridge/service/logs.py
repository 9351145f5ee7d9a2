"""Structured (one JSON object per line) logging for both services.

Under systemd the lines go to the journal through stderr; the journal files every line at
``info`` unless it starts with a syslog ``<N>`` prefix (SyslogLevelPrefix=, on by
default), so ``journalctl -p err`` would find nothing. The prefix is added only when
systemd says stderr *is* the journal (``JOURNAL_STREAM`` names stderr's device and
inode): in a container or a terminal the lines stay plain JSON for their parsers.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

__all__ = ["JournalPriority", "JsonFormatter", "setup_logging", "stream_is_journal"]

# syslog(3) priorities, as journald files them (`journalctl -p`).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...}``; journald and log shippers parse it."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalPriority(logging.Formatter):
    """Another formatter's line behind the ``<N>`` prefix journald reads as its priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
        return f"<{_PRIORITY[level]}>{self._inner.format(record)}"


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected ``stream`` to the journal: ``JOURNAL_STREAM`` is
    ``device:inode`` of that very file (a child whose stderr was redirected keeps the
    variable but not the stream, so the variable alone is not enough)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (pytest's capture, a closed stream)
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def setup_logging(level: str, *, json_lines: bool = True, log_file: str | None = None) -> None:
    """Configure the root logger once; uvicorn's access log stays off (it costs ~25%).

    ``log_file`` (LOG_FILE) gets the same lines as stderr, without the journal's priority
    prefix; a WatchedFileHandler reopens it after logrotate moves it away.
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter = (JsonFormatter() if json_lines
                 else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setFormatter(JournalPriority(formatter) if stream_is_journal(sys.stderr)
                         else formatter)
    handlers: list[logging.Handler] = [handler]
    if log_file:
        to_file = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(formatter)
        handlers.append(to_file)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    for noisy in ("uvicorn.access", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
