"""The blocking driver's graceful stop, in phases: serving → grace → drain → done.

``Server.shutdown()`` (or SIGINT/SIGTERM, turned into the same call) counts a
request and wakes the loop, which calls ``on_wake`` here:

* serving → grace: the engine is fed ``stop_accepting`` (new calls refused,
  503 with Retry-After) and running calls get ``grace_period`` seconds;
* grace → drain: when no call is left, a second shutdown request arrives, or
  the grace period is over, the engine is fed ``end_all_calls`` (BYE on both
  legs); the loop keeps serving for ``drain_period`` while the BYE transactions
  and the last record writes finish;
* drain → done: once the engine is idle and no write waits for a retry (or the
  drain period is over; a record still unwritten is then logged whole). The
  loop in server.py ends when the phase is done.

The loop calls ``advance`` in its housekeeping and waits no longer than
``deadline()``.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ._backends import Backends
from ._report import Report
from ._seams import DrivenEngine, Input
from .options import DriverOptions

__all__ = ["Shutdown"]

_SHUTDOWN_POLL = 0.1  # how often a shutdown phase looks at the engine


class Shutdown:
    """The phase of the stop; ``handle`` feeds an input to the engine now."""

    def __init__(
        self,
        engine: DrivenEngine,
        options: DriverOptions,
        report: Report,
        backends: Backends,
        *,
        handle: Callable[[Input], None],
    ) -> None:
        self._engine = engine
        self._options = options
        self._report = report
        self._backends = backends
        self._handle = handle
        self.requests = 0
        self._signals: list[int] = []
        self.phase = "serving"  # → "grace" → "drain" → "done"
        self._phase_until = math.inf

    def install_signals(self, request: Callable[[], None]) -> dict[int, Any]:
        """SIGINT and SIGTERM call ``request`` (the server's ``shutdown``), when the options
        ask for it and this is the main thread; returns the handlers they replaced."""
        if (
            not self._options.handle_signals
            or threading.current_thread() is not threading.main_thread()
        ):
            return {}

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # Nothing but a wake-up here: the handler may interrupt the loop in the middle of
            # writing a log line, under the logger's lock.
            self._signals.append(signum)
            request()

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_wake(self) -> None:
        """Log the signals received; on the first request, stop accepting and start the grace."""
        while self._signals:
            self._report.note(
                "info", "server.signal", signal=signal.Signals(self._signals.pop(0)).name
            )
        if self.requests and self.phase == "serving":
            self._report.note("info", "server.stopping", active_calls=self._engine.active_calls)
            self._handle(Input(self._engine.stop_accepting, "stop_accepting"))
            self.phase, self._phase_until = "grace", time.monotonic() + self._options.grace_period

    def deadline(self) -> float:
        """When a phase next needs a look (infinity while serving)."""
        if self.phase == "serving":
            return math.inf
        return min(self._phase_until, time.monotonic() + _SHUTDOWN_POLL)

    def advance(self, now: float) -> None:
        engine = self._engine
        if self.phase == "grace" and (
            engine.active_calls == 0 or self.requests > 1 or now >= self._phase_until
        ):
            self._handle(Input(engine.end_all_calls, "end_all_calls"))
            self.phase, self._phase_until = "drain", now + self._options.drain_period
        elif self.phase == "drain" and (
            (engine.idle and not self._backends.retries) or now >= self._phase_until
        ):
            self._backends.log_unwritten()
            self.phase = "done"
