"""The blocking driver's back-end calls: account look-ups, relay calls, store writes.

server.py's ``_perform`` hands the back-end actions here (``LookupAccount``,
``AllocateMedia``, ``UpdateMedia``, ``ReleaseMedia``, the write of a
``CallRecord``); each answer the engine needs is queued as an input, fed
before the loop waits again (performing never feeds the engine). Once a second
the loop polls the relay for calls it ended on its own (media timeout, shard
lost) and feeds each to ``media_ended``.

The trade-off: the account store and the relay are called inline, so while
one of them works nothing else does. SQLite answers a cached account look-up
in microseconds and a record write in about a millisecond, and the relay
answers from loopback in well under one; their own deadlines (SQLite's busy
timeout, the relay client's retries) bound the worst case. A look-up that took
longer than ``store_timeout`` is answered 503 all the same, as io_anyio answers
one it abandons at that deadline. A host that needs the loop to stay
responsive whatever the store does runs io_anyio, which calls them in worker
threads under a deadline.

A failed store write does not block the loop either: it, and the actions the
engine ordered after a record (the answer to a BYE waits until the record is
durable), wait in a retry list, retried with a doubling delay up to
``record_retry_max``. A record still unwritten when the server exits is
logged whole (``record.unwritten``), never dropped silently.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial

import attrs

from sansio_sip import (
    AccountStore,
    Action,
    AllocateMedia,
    CallRecord,
    LookupAccount,
    MediaRelay,
    MediaUnavailable,
    ReleaseMedia,
    StoreUnavailable,
    UpdateMedia,
)

from ._report import Report
from ._seams import DrivenEngine, Input
from .options import DriverOptions

__all__ = ["Backends"]


@attrs.define(eq=False)
class _Retry:
    """A store write that failed, and the actions that wait for it."""

    what: str
    write: Callable[[], None]
    then: Sequence[Action]
    due: float
    delay: float
    attempt: int = 1
    record: CallRecord | None = None


class Backends:
    """The ``store`` and the ``relay`` (None: no media relay, calls fail with the engine's
    answer to ``media_failed``), called inline.

    ``handle`` feeds an input to the engine now, ``queue`` queues one for the loop to
    feed, ``perform`` performs the actions that waited for a retried write."""

    def __init__(
        self,
        engine: DrivenEngine,
        store: AccountStore,
        relay: MediaRelay | None,
        options: DriverOptions,
        report: Report,
        *,
        handle: Callable[[Input], None],
        queue: Callable[[Input], None],
        perform: Callable[[Sequence[Action]], None],
    ) -> None:
        self._engine = engine
        self._store = store
        self._relay = relay
        self._options = options
        self._report = report
        self._handle = handle
        self._queue = queue
        self._perform = perform
        self.retries: list[_Retry] = []
        self._next_poll = 0.0

    def records_pending(self) -> int:
        """Call records waiting for a retried write."""
        return sum(1 for retry in self.retries if retry.record)

    def deadlines(self) -> list[float]:
        """When the relay is next polled, and when each write is next retried."""
        return [
            self._next_poll if self._relay is not None else math.inf,
            *(retry.due for retry in self.retries),
        ]

    # -- performing --------------------------------------------------------------------------

    def lookup_account(self, action: LookupAccount) -> None:
        """Ask the store inline. A look-up that outlasted ``store_timeout`` is answered
        as unavailable (503), as io_anyio answers one it abandons at the deadline: the
        same answer from both drivers, only later here (nothing can cut a call short)."""
        engine = self._engine
        start = time.monotonic()
        try:
            account = self._store.get_account(action.username)
            took = time.monotonic() - start
            if took > self._options.store_timeout:
                raise TimeoutError(f"took {took:.3f} s, over store_timeout")
        except Exception as exc:
            self._failed("store", "get_account", exc)
            self._queue(Input(partial(engine.account_unavailable, action.token), "account"))
            return
        self._queue(Input(partial(engine.account_found, action.token, account), "account"))

    def allocate_media(self, action: AllocateMedia) -> None:
        engine, relay = self._engine, self._relay
        try:
            if relay is None:
                raise MediaUnavailable("no media relay configured")
            allocation = relay.allocate(action.call_ref, a_peer=action.a_peer, echo=action.echo)
        except Exception as exc:
            self._failed("relay", "allocate", exc)
            reason = str(exc) or type(exc).__name__
            self._queue(Input(partial(engine.media_failed, action.token, reason), "media"))
            return
        self._queue(Input(partial(engine.media_allocated, action.token, allocation), "media"))

    def update_media(self, action: UpdateMedia) -> None:
        if self._relay is None:
            return
        try:
            self._relay.update(
                action.call_ref,
                a_peer=action.a_peer,
                b_peer=action.b_peer,
                a_events=action.a_events,
                b_events=action.b_events,
            )
        except Exception as exc:
            self._failed("relay", "update", exc)

    def release_media(self, action: ReleaseMedia) -> None:
        if self._relay is None:
            return
        try:
            a_leg, b_leg = self._relay.release(action.call_ref)
        except Exception as exc:
            self._failed("relay", "release", exc)
            return
        write = partial(self._store.attach_media_stats, action.call_ref, a_leg, b_leg)
        self._write_or_retry("media_stats", write, (), None)

    def write_record(self, action: CallRecord, then: Sequence[Action]) -> bool:
        """Write the record now (True); on failure keep it and ``then``, the actions that
        must wait until it is durable, for a later retry (False)."""
        write = partial(self._store.write_call_record, action.record)
        return self._write_or_retry("record", write, then, action)

    # -- the loop's housekeeping -------------------------------------------------------------

    def poll_relay_if_due(self, now: float) -> None:
        """Calls the relay ended on its own (media timeout, shard lost) → ``media_ended``."""
        if self._relay is None or now < self._next_poll:
            return
        self._next_poll = now + self._options.expire_poll
        try:
            ended = self._relay.expired()
        except Exception as exc:
            self._failed("relay", "expired", exc)
            return
        for call_ref, reason in ended:
            self._handle(Input(partial(self._engine.media_ended, call_ref, reason), "media"))

    def retry_due(self, now: float) -> None:
        """Retry the writes that are due; perform what waited for each that succeeds."""
        for retry in [retry for retry in self.retries if retry.due <= now]:
            try:
                retry.write()
            except Exception as exc:
                retry.attempt += 1
                self._report.counters["store_write_retries"] += 1
                self._failed("store", retry.what, exc, attempt=retry.attempt)
                retry.delay = min(retry.delay * 2, self._options.record_retry_max)
                retry.due = now + retry.delay
                continue
            self.retries.remove(retry)
            self._perform(retry.then)

    def log_unwritten(self) -> None:
        """Exiting with the store still failing: each record goes to the log whole, so an
        operator can replay it; it is never dropped silently."""
        for retry in self.retries:
            if retry.record is not None:
                record = retry.record.record
                self._report.note(
                    "error",
                    "record.unwritten",
                    call_ref=record.call_ref,
                    record=json.dumps(attrs.asdict(record), default=str),
                )

    # -- helpers -----------------------------------------------------------------------------

    def _write_or_retry(
        self,
        what: str,
        write: Callable[[], None],
        then: Sequence[Action],
        record: CallRecord | None,
    ) -> bool:
        """Write now; on failure keep the write and ``then`` for a later retry (False)."""
        try:
            write()
        except Exception as exc:
            self._report.counters["store_write_retries"] += 1
            self._failed("store", what, exc, attempt=1)
            delay = 0.2
            due = time.monotonic() + delay
            self.retries.append(_Retry(what, write, then, due, delay, record=record))
            return False
        return True

    def _failed(self, backend: str, what: str, exc: Exception, **fields: int) -> None:
        expected = isinstance(exc, StoreUnavailable | MediaUnavailable)
        self._report.counters[f"{backend}_errors"] += 1
        self._report.note(
            "warning" if expected else "error",
            f"{backend}.failed",
            operation=what,
            error=repr(exc),
            **fields,
        )
