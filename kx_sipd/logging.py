"""kx-sipd's log: one JSON object per line on stderr, written with orjson.

Each line is ``{"time": ISO 8601 UTC with milliseconds, "level": ..., "event":
a stable key such as "server.started", "fields": {...}}``: the same shape as
the relay's log (rtp_relay/_log.py), so one ``jq`` filter reads both. Levels
below the configured one (``--log-level``) are skipped before anything is
formatted: at debug level the engine logs every message, and at the default
info level that cost must be nil.

The engine and the drivers hand their events over as ``sansio_sip.Log``
actions; ``JsonLogger`` is the callable they are given. Writing is one
``write`` of a whole line under a lock, so lines from worker threads never
interleave.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import BinaryIO

import orjson

from sansio_sip import Log

__all__ = ["LEVELS", "JsonLogger", "capture_library_logs"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class JsonLogger:
    """Writes ``Log`` entries at or above ``level`` to ``stream`` (default: stderr)."""

    def __init__(self, level: str = "info", stream: BinaryIO | None = None) -> None:
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
        self._threshold = LEVELS[level]
        self._stream = stream
        self._lock = threading.Lock()

    def enabled(self, level: str) -> bool:
        """Whether an entry of ``level`` would be written (unknown levels are)."""
        return LEVELS.get(level, 40) >= self._threshold

    def __call__(self, entry: Log) -> None:
        """Write one engine or driver ``Log`` action."""
        if LEVELS.get(entry.level, 40) >= self._threshold:
            self._write(entry.level, entry.event, entry.as_dict())

    def log(self, level: str, event: str, **fields: object) -> None:
        """Write an event of the application itself."""
        if LEVELS.get(level, 40) >= self._threshold:
            self._write(level, event, fields)

    def _write(self, level: str, event: str, fields: Mapping[str, object]) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        line = orjson.dumps(
            {
                "time": f"{stamp}.{int(now % 1 * 1000):03d}Z",
                "level": level,
                "event": event,
                "fields": fields,
            },
            default=str,  # a value orjson does not know is logged as its str(), never dropped
            option=orjson.OPT_APPEND_NEWLINE,
        )
        stream = self._stream if self._stream is not None else sys.stderr.buffer
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                # stderr closed or full (a detached daemon, a broken pipe): logging must never
                # take the server down with it.
                pass


class _Bridge(logging.Handler):
    """Turns a library's stdlib log records into JSON lines, so nothing else
    reaches stderr as plain text (a log shipper would choke on it)."""

    def __init__(self, logger: JsonLogger, event: str) -> None:
        super().__init__()
        self._logger = logger
        self._event = event

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        level = level if level in LEVELS else ("error" if record.levelno >= 40 else "info")
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        self._logger.log(level, self._event, logger=record.name, message=message)


def capture_library_logs(logger: JsonLogger, name: str, event: str) -> None:
    """Route the stdlib logger ``name`` (e.g. "rtp_relay") into ``logger`` as ``event``."""
    library = logging.getLogger(name)
    library.handlers = [_Bridge(logger, event)]
    library.propagate = False
    library.setLevel(logging.DEBUG if logger.enabled("debug") else logging.INFO)
