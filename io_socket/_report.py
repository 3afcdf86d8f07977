"""The blocking driver's counters and its own log lines (server.py ``stats()``).

Every part of the driver counts and logs through one ``Report``: the loop
(engine bugs), UDP and TCP (drops, refusals, closes), the back-ends (failures,
retries), the shutdown phases. Calls to observers (``MessageTrace``,
``on_record``) go through ``traced``, so an observer's failure is counted and
logged once, never fatal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from sansio_sip import Address, Log

from ._seams import LogSink
from ._sockets import format_addresses

__all__ = ["Report"]


class Report:
    """Counters by name, and log lines to the ``log`` sink (None: not logged)."""

    def __init__(self, log: LogSink | None) -> None:
        self.counters: Counter[str] = Counter()
        self._log = log

    def emit(self, entry: Log) -> None:
        """Pass on one of the engine's ``Log`` actions."""
        if self._log is not None:
            self._log(entry)

    def note(self, level: str, event: str, **fields: str | int | float | None) -> None:
        """Log one of the driver's own events."""
        if self._log is not None:
            self._log(Log(level=level, event=event, fields=tuple(fields.items())))

    def traced(self, hook: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Call an observer; its failure is counted and logged once, never fatal."""
        try:
            hook(*args, **kwargs)
        except Exception as exc:
            self.counters["trace_errors"] += 1
            if self.counters["trace_errors"] == 1:
                self.note("error", "trace.failed", error=repr(exc))

    def dropped(self, counter: str, event: str, peer: Address) -> None:
        """Count a drop; log the first and then every 1,000th, so a flood cannot flood the log."""
        self.counters[counter] += 1
        count = self.counters[counter]
        if count == 1 or count % 1000 == 0:
            self.note("warning", event, peer=format_addresses([peer]), count=count)
