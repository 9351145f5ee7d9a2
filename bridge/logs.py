"""Structured (one JSON object per line) logging for both services."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time


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


def setup_logging(level: str, *, json_lines: bool = True, log_file: str | None = None) -> None:
    """Configure the root logger once; uvicorn's access log stays off (it costs ~25%).

    ``log_file`` (LOG_FILE) gets the same lines as stderr; a WatchedFileHandler reopens
    it after logrotate moves it away.
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter = (JsonFormatter() if json_lines
                 else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setFormatter(formatter)
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
