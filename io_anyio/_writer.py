"""The store's writes (call records, media figures) in one long-lived thread.

Why: a call makes three writes (its record when it starts, its record when it
ends, the relay's media figures). Each through ``anyio.to_thread.run_sync``
cost 130-190 us of CPU for the hop alone (a task, a cancel scope, the worker
queue's condition, the result posted back) plus a commit of its own unless
another thread's write happened to share it. Here the loop appends the write
to a list under a lock and returns; one thread takes what has gathered, writes
it, and posts what follows each write back to the loop (``post``: one wake-up
of the loop per batch).

Batches: a store with ``write_batch(items)`` (``kx_sipd.store.Store``: all the
items in one transaction, one fsync) gets everything that gathered within
``BATCH_WINDOW`` of the first write waiting, up to ``BATCH_MAX``; a commit costs
~250 us of CPU alone and ~50 us shared. Any other ``AccountStore`` (test doubles,
wrappers) gets ``write_call_record`` / ``attach_media_stats`` one at a time,
without the wait.

Order and failures: writes are done in the order they were submitted. A batch
that fails is written again one write at a time; a write that fails is
reported (``on_failure``, in the loop) and tried again after 0.2 s, doubling up
to ``retry_max`` while any keeps failing, and so is every later write of the
same call (a call's writes stay in order), while other calls' writes go on:
one write the store refuses does not stall the server, and records are never
dropped while it runs. A write blocks this thread for
as long as the store takes (SQLite gives up on a lock after its busy timeout);
nothing on the loop waits for it except what the engine ordered after a record
(the answer to a BYE is sent once its record is durable).

``stop`` ends the thread (after its current write, within a timeout) and
returns what was not written, for the server to log whole.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Final

from sansio_sip import AccountStore, CallRecordData, MediaStats

__all__ = [
    "BATCH_MAX",
    "BATCH_WINDOW",
    "BATCH_WINDOW_MIN",
    "StoreWriter",
    "Write",
    "batch_window",
]

BATCH_WINDOW: Final = 0.05
"""Seconds a batch gathers after its first write at most (batching stores only);
how long it gathers is ``BATCH_WINDOW_PER_RATE`` times the rate writes came at
(counted over a second or more), between ``BATCH_WINDOW_MIN`` and this.

This thread shares the interpreter with the loop: each batch costs a commit
(its fsync ~250 us of CPU) and a wake-up of the loop, and every hop of the GIL
between the two threads slows the loop. At 200 calls/s (~600 writes/s), 5 ms
gathered about 3 writes a batch and this thread took 0.70 ms of CPU per call;
50 ms gathers ~30, and it takes 0.35 ms, the loop's thread 0.27 ms less
(bench/calls.py, per-thread CPU). What waits for a batch is a call's B-leg
INVITE (its first record is durable first) and the answer to its BYE: 50 ms is
nothing against SIP's 500 ms T1 or a post-dial delay, but where there is no
load to share a commit with, waiting buys nothing, so a quiet server waits 5 ms."""

BATCH_WINDOW_MIN: Final = 0.005
BATCH_WINDOW_PER_RATE: Final = 1 / 6_000
"""Seconds of gathering per write/s of rate: from 300 writes/s (100 calls/s) a
batch gathers the full 50 ms, below 30 writes/s (10 calls/s) the 5 ms minimum."""

BATCH_MAX: Final = 256
"""Writes per batch at most: one transaction stays short under a backlog."""

_FIRST_RETRY: Final = 0.2

MediaStatsWrite = tuple[str, MediaStats | None, MediaStats | None]


class Write:
    """One write: a call record or a call's media figures, and what to run in the
    loop once it is durable (``done``; None: nothing)."""

    __slots__ = ("attempts", "call_ref", "done", "item", "what")

    def __init__(
        self,
        item: CallRecordData | MediaStatsWrite,
        done: Callable[[], None] | None,
    ) -> None:
        self.item = item
        self.done = done
        if isinstance(item, CallRecordData):
            self.what, self.call_ref = "record", item.call_ref
        else:
            self.what, self.call_ref = "media_stats", item[0]
        self.attempts = 0

    def perform(self, store: AccountStore) -> None:
        if isinstance(self.item, CallRecordData):
            store.write_call_record(self.item)
        else:
            store.attach_media_stats(*self.item)


def batch_window(rate: float) -> float:
    """How long a batch gathers when writes came at ``rate`` per second."""
    return min(BATCH_WINDOW, max(BATCH_WINDOW_MIN, rate * BATCH_WINDOW_PER_RATE))


class StoreWriter:
    """Writes to ``store`` in a thread of its own, in order, in batches.

    ``post(callbacks)`` must run each of ``callbacks`` in the loop soon, in order
    (thread-safe); ``on_failure(what, exc, attempt)`` is posted for every failed
    attempt."""

    def __init__(
        self,
        store: AccountStore,
        *,
        post: Callable[[list[Callable[[], None]]], None],
        on_failure: Callable[[str, Exception, int], None],
        retry_max: float,
    ) -> None:
        self._store = store
        self._post = post
        self._on_failure = on_failure
        self._retry_max = retry_max
        batch: Callable[[Sequence[CallRecordData | MediaStatsWrite]], None] | None
        batch = getattr(store, "write_batch", None)
        self._write_batch = batch
        self._queue: list[Write] = []
        self._writing: list[Write] = []  # taken by the thread, not yet durable
        self._retry: list[Write] = []  # failed, to be tried again at _retry_at
        self._blocked: set[str] = set()  # calls with a write in _retry (thread only)
        self._retry_at = 0.0
        self._delay = _FIRST_RETRY
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = False  # the thread waits for a first write: wake it
        # The write rate, counted over a second or more: a burst of a few writes
        # close together is no load to gather a batch for.
        self._submitted = 0
        self._counting_since = time.monotonic()
        self._rate = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kx-store-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Write) -> None:
        """Queue a write (from the loop; returns at once)."""
        with self._lock:
            self._queue.append(write)
            self._submitted += 1
            if self._idle or len(self._queue) >= BATCH_MAX:
                self._idle = False
                self._wake.notify()

    def stop(self, timeout: float) -> list[Write]:
        """End the thread, waiting up to ``timeout`` s for a write under way;
        returns the writes not known to be durable, in order."""
        self._stopping.set()
        with self._lock:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            left = [*self._retry, *self._writing, *self._queue]
            self._retry, self._writing, self._queue = [], [], []
        return left

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._write_new(batch)
            if self._retry and time.monotonic() >= self._retry_at:
                self._write_retries()

    def _take(self) -> list[Write] | None:
        """The next batch; [] when it is time to try failed writes again; None when
        stopping with nothing left to write."""
        with self._lock:
            while not self._queue and not self._stopping.is_set():
                self._idle = True
                if not self._retry:
                    self._wake.wait()
                    continue
                left = self._retry_at - time.monotonic()
                if left <= 0:
                    self._idle = False
                    return []
                self._wake.wait(left)
            self._idle = False
            if not self._queue:
                return None  # stopping: stop() hands back what is waiting for a retry
            now = time.monotonic()
            if now - self._counting_since >= 1.0:
                self._rate = self._submitted / (now - self._counting_since)
                self._submitted, self._counting_since = 0, now
            if self._write_batch is not None and not self._stopping.is_set():
                deadline = now + batch_window(self._rate)
                while len(self._queue) < BATCH_MAX and not self._stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
            self._writing, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
            return list(self._writing)

    def _write_new(self, batch: list[Write]) -> None:
        """Write a batch in one go; if that fails, each write on its own, so one
        write the store refuses does not hold up the others."""
        done: list[Write] = []
        if self._write_batch is not None and not self._blocked:
            try:
                self._write_batch([write.item for write in batch])
                done = batch
            except Exception as exc:
                self._post([partial(self._on_failure, "batch", exc, 1)])
        if not done:
            done = self._write_each(batch)
        with self._lock:
            self._writing = []
        self._finished(done)

    def _write_retries(self) -> None:
        with self._lock:
            self._writing, self._retry = self._retry, []
            self._blocked = set()
        done = self._write_each(self._writing)
        with self._lock:
            self._writing = []
        if self._retry:
            self._delay = min(self._delay * 2, self._retry_max)
            self._retry_at = time.monotonic() + self._delay
        self._finished(done)

    def _write_each(self, writes: list[Write]) -> list[Write]:
        """Each write on its own, in order; a failed one waits for a retry, and so
        does every later write of the same call (its writes stay in order)."""
        done: list[Write] = []
        for write in writes:
            if write.call_ref not in self._blocked:
                write.attempts += 1
                try:
                    write.perform(self._store)
                except Exception as exc:
                    self._post([partial(self._on_failure, write.what, exc, write.attempts)])
                else:
                    done.append(write)
                    continue
            if not self._retry:
                self._delay = _FIRST_RETRY
                self._retry_at = time.monotonic() + self._delay
            with self._lock:
                self._retry.append(write)
            self._blocked.add(write.call_ref)
        return done

    def _finished(self, done: list[Write]) -> None:
        callbacks = [write.done for write in done if write.done is not None]
        if callbacks:
            self._post(callbacks)
