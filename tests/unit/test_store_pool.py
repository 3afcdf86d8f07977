"""The store's connection pool: connections follow how many threads use the
store at once, not how many threads ever did (AnyIO's worker threads come and
go), and every connection is closed by the store itself, never left to the
cyclic garbage collector (a ``sqlite3.Connection`` references itself through
its statement cache, so an unclosed one outlives its last user).

Open connections are counted from /proc/self/fd: each holds one descriptor on
the write-ahead log (its descriptor on the database file itself is not a
count: SQLite keeps a closed connection's one open, for reuse, while other
connections of the process hold locks on the file)."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kx_sipd import store as store_module
from kx_sipd.store import Store
from sansio_sip import CallRecordData

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def open_connections(path: Path) -> int:
    """Descriptors this process has on the database's WAL (one per connection)."""
    wanted = str(path.resolve()) + "-wal"
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == wanted:
                count += 1
        except OSError:  # closed meanwhile
            continue
    return count


def record(call_ref: str) -> CallRecordData:
    return CallRecordData(
        call_ref=call_ref, account="alice", a_call_id=f"{call_ref}@client", b_call_id=None,
        source="198.51.100.7:5062", transport="UDP", user_agent="test", dialed="17752180264",
        sent_digits=None, route=None, start_wall=1_700_000_000.0,
    )  # fmt: skip


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "kx.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    with Store(path) as opened:
        opened.add_account("alice", "pw")
        yield opened


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic collector off, so a connection left unclosed stays visible."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@pytest.mark.usefixtures("no_collector")
def test_threads_that_come_and_go_reuse_one_connection(store: Store, path: Path) -> None:
    assert open_connections(path) == 1
    for index in range(30):  # one after the other, as idle worker threads expire
        thread = threading.Thread(
            target=lambda i=index: (
                store.get_account("alice"),
                store.write_call_record(record(f"c{i}")),
                store.list_calls(limit=1),
            )
        )
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert open_connections(path) == 1
    assert len(store.list_calls(limit=None)) == 30


@pytest.mark.usefixtures("no_collector")
def test_at_most_the_idle_bound_stays_open_after_a_burst(store: Store, path: Path) -> None:
    bound = store_module._IDLE_CONNECTIONS
    # Ten users at once (borrowed together, as ten busy threads would), then none.
    held = [store._borrow() for _ in range(10)]
    assert open_connections(path) == 10
    for holder in held:
        store._give_back(holder)
    assert open_connections(path) == bound

    def work(index: int) -> bool:
        account = store.get_account("alice")
        store.write_call_record(record(f"b{index}"))
        return account is not None

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(80)))
    assert open_connections(path) <= bound
    assert len(store.list_calls(limit=None)) == 80


def test_a_connection_is_never_lent_to_two_users_at_once(store: Store) -> None:
    held = [store._borrow() for _ in range(6)]
    assert len({id(holder) for holder in held}) == 6
    for holder in held[:3]:
        store._give_back(holder)
    again = store._borrow()
    assert again is held[2]  # the most recently returned: its cache is the warmest
    for holder in [again, *held[3:]]:
        store._give_back(holder)


def test_close_closes_idle_and_borrowed_connections_and_the_store_reopens(
    store: Store, path: Path
) -> None:
    borrowed = store._borrow()
    idle = [store._borrow() for _ in range(2)]
    for holder in idle:
        store._give_back(holder)
    assert open_connections(path) == 3
    store.close()
    assert open_connections(path) == 0
    store._give_back(borrowed)  # returned after close: closed already, not pooled again
    assert open_connections(path) == 0
    assert store.get_account("alice") is not None
    assert open_connections(path) == 1


def test_a_failed_connection_is_not_pooled_again(store: Store, path: Path) -> None:
    holder = store._borrow()
    store._discard(holder)
    store._give_back(holder)
    assert open_connections(path) == 0
    assert store.get_account("alice") is not None  # a new one
    assert open_connections(path) == 1


def test_every_connection_has_the_small_page_cache(store: Store) -> None:
    held = [store._borrow() for _ in range(3)]
    try:
        sizes = {holder.db.execute("PRAGMA cache_size").fetchall()[0][0] for holder in held}
    finally:
        for holder in held:
            store._give_back(holder)
    assert sizes == {-store_module._CACHE_KIB}
