"""JSON-lines logging for the relay processes, in the same shape as kx-sipd's
own log (one orjson object per line on stderr: time, level, event, fields),
so an operator reads one format whether the relay runs inside ``kx-sipd
serve`` or standalone."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["event", "setup_logging"]

LOGGER = logging.getLogger("rtp_relay")


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "fields": fields,
        }
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str) -> None:
    """Send the ``rtp_relay`` logger to stderr as JSON lines (idempotent per process)."""
    LOGGER.setLevel(level.upper())
    if not any(getattr(h, "_kx_relay", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonLines())
        handler._kx_relay = True  # type: ignore[attr-defined]  # marker for idempotence
        LOGGER.addHandler(handler)
        LOGGER.propagate = False


def event(level: int, name: str, **fields: Any) -> None:
    """Log ``name`` with structured ``fields`` on the relay logger."""
    LOGGER.log(level, name, extra={"fields": fields})
