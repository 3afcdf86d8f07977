"""io_anyio's store writer thread (io_anyio/_writer.py): order, batches, retries, stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import pytest
from driver_fakes import FakeStore, make_record

from io_anyio._writer import StoreWriter, Write
from kx_sipd.store import MediaStatsWrite, Store
from sansio_sip import CallRecordData, MediaStats, StoreUnavailable

WAIT = 5.0  # upper bound of every wait; never an assertion about speed


class Loop:
    """Stands in for the server's loop: what the writer posts, run on ``drain``."""

    def __init__(self) -> None:
        self.posted: list[Callable[[], None]] = []
        self.lock = threading.Lock()
        self.failures: list[tuple[str, str, int]] = []
        self.done: list[str] = []

    def post(self, callbacks: list[Callable[[], None]]) -> None:
        with self.lock:
            self.posted.extend(callbacks)

    def drain(self) -> None:
        with self.lock:
            callbacks, self.posted = self.posted, []
        for callback in callbacks:
            callback()

    def on_failure(self, what: str, exc: Exception, attempt: int) -> None:
        self.failures.append((what, str(exc), attempt))

    def wait_for(self, predicate: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            self.drain()
            if predicate():
                return True
            time.sleep(0.005)
        return False

    def writer(self, store: object) -> StoreWriter:
        return StoreWriter(
            store,  # type: ignore[arg-type]
            post=self.post,
            on_failure=self.on_failure,
            retry_max=0.4,
        )

    def write(self, item: CallRecordData | MediaStatsWrite, label: str) -> Write:
        return Write(item, lambda: self.done.append(label))


class BatchCountingStore(Store):
    """Counts batches; the first one waits for ``gate``, so what is submitted
    meanwhile gathers behind it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []
        self.gate = threading.Event()

    def write_batch(self, writes: Sequence[CallRecordData | MediaStatsWrite]) -> None:
        if not self.batches:
            assert self.gate.wait(WAIT)
        self.batches.append(len(writes))
        super().write_batch(writes)


def test_writes_share_batches_and_complete_in_order(tmp_path: Path) -> None:
    loop = Loop()
    store = BatchCountingStore(tmp_path / "kx.sqlite")
    writer = loop.writer(store)
    writer.start()
    labels = []
    for index in range(40):
        labels.append(f"r{index}")
        writer.submit(loop.write(make_record(f"c{index}"), f"r{index}"))
        if index % 4 == 3:
            labels.append(f"m{index}")
            stats = (f"c{index}", MediaStats(packets_in=index), None)
            writer.submit(loop.write(stats, f"m{index}"))
    store.gate.set()
    assert loop.wait_for(lambda: len(loop.done) == len(labels))
    assert writer.stop(WAIT) == []
    assert loop.done == labels and loop.failures == []
    assert sum(store.batches) == len(labels) and len(store.batches) <= 2
    entries = store.list_calls(limit=None)
    assert len(entries) == 40
    assert {entry.record.call_ref for entry in entries if entry.a_media is not None} == {
        f"c{index}" for index in range(3, 40, 4)
    }
    store.close()


def test_a_store_without_batches_gets_one_write_at_a_time_retried_until_taken() -> None:
    loop = Loop()
    store = FakeStore()
    store.write_failures = 2
    writer = loop.writer(store)
    writer.start()
    writer.submit(loop.write(make_record("call-1"), "first"))
    writer.submit(loop.write(make_record("call-2"), "second"))
    writer.submit(Write(("call-2", None, MediaStats(packets_out=1)), None))
    assert loop.wait_for(lambda: loop.done == ["first", "second"] and len(store.stats) == 1)
    assert writer.stop(WAIT) == []
    assert [record.call_ref for _, record in store.records] == ["call-1", "call-2"]
    # Both records failed once (the fake fails the next two writes, whoever's), and
    # call-2's media figures waited behind its record.
    assert loop.failures == [
        ("record", "write failed for the test", 1),
        ("record", "write failed for the test", 1),
    ]


class PickyStore(Store):
    """Refuses every write of call ``bad`` (alone or in a batch)."""

    def write_call_record(self, record: CallRecordData) -> None:
        self._refuse([record])
        super().write_call_record(record)

    def attach_media_stats(
        self, call_ref: str, a_leg: MediaStats | None, b_leg: MediaStats | None
    ) -> None:
        self._refuse([(call_ref, a_leg, b_leg)])
        super().attach_media_stats(call_ref, a_leg, b_leg)

    def write_batch(self, writes: Sequence[CallRecordData | MediaStatsWrite]) -> None:
        self._refuse(writes)
        super().write_batch(writes)

    def _refuse(self, writes: Sequence[CallRecordData | MediaStatsWrite]) -> None:
        for item in writes:
            if (item.call_ref if isinstance(item, CallRecordData) else item[0]) == "bad":
                raise StoreUnavailable("refused for the test")


def test_a_write_the_store_refuses_holds_up_only_its_own_call(tmp_path: Path) -> None:
    loop = Loop()
    store = PickyStore(tmp_path / "kx.sqlite")
    writer = loop.writer(store)
    writer.start()
    bad, bad_end = make_record("bad"), attrs.evolve(make_record("bad"), final_status=200)
    writer.submit(loop.write(bad, "bad"))
    writer.submit(loop.write(make_record("good"), "good"))
    writer.submit(loop.write(("bad", MediaStats(packets_in=1), None), "bad stats"))
    writer.submit(loop.write(bad_end, "bad end"))
    writer.submit(loop.write(("good", MediaStats(packets_in=2), None), "good stats"))
    assert loop.wait_for(lambda: loop.done == ["good", "good stats"])
    assert loop.wait_for(lambda: sum(what == "record" for what, _, _ in loop.failures) >= 2)
    # A call's later writes were never tried before its first: only its record failed.
    assert {what for what, _, _ in loop.failures} <= {"batch", "record"}
    assert [write.item for write in writer.stop(WAIT)] == [
        bad,
        ("bad", MediaStats(packets_in=1), None),
        bad_end,
    ]
    assert [entry.record.call_ref for entry in store.list_calls(limit=None)] == ["good"]
    store.close()


def test_stop_hands_back_what_a_failing_store_did_not_take() -> None:
    loop = Loop()
    store = FakeStore()
    store.write_failures = 1000
    writer = loop.writer(store)
    writer.start()
    first, second = make_record("call-1"), make_record("call-2")
    writer.submit(loop.write(first, "first"))
    writer.submit(loop.write(second, "second"))
    assert loop.wait_for(lambda: len(loop.failures) >= 2)
    left = writer.stop(WAIT)
    assert [write.item for write in left] == [first, second]
    assert loop.done == [] and store.records == []


def test_a_batch_gathers_longer_the_faster_writes_come() -> None:
    """A quiet server waits the minimum for company that is not coming; at 200
    calls/s (~600 writes/s) a batch gathers the full window."""
    from io_anyio._writer import BATCH_WINDOW, BATCH_WINDOW_MIN, batch_window

    assert batch_window(0.0) == BATCH_WINDOW_MIN == 0.005
    assert batch_window(10.0) == BATCH_WINDOW_MIN
    assert batch_window(600.0) == pytest.approx(BATCH_WINDOW) and BATCH_WINDOW == 0.05
    assert batch_window(100_000.0) == BATCH_WINDOW
    windows = [batch_window(rate) for rate in range(0, 1000, 10)]
    assert windows == sorted(windows)
    assert BATCH_WINDOW_MIN < batch_window(150.0) < BATCH_WINDOW
