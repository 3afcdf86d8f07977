"""The SQLite store: schema and migrations, accounts and routes, HA1, the
account cache, realm, failure modes and recovery, call records, crash safety."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest

from kx_sipd import _schema
from kx_sipd.store import (
    ECHO_ROUTE,
    Conflict,
    NotFound,
    RealmMismatch,
    Store,
    StoreError,
)
from sansio_sip import (
    CallRecordData,
    LadderEntry,
    MediaStats,
    Route,
    StoreUnavailable,
    Transport,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "kx.sqlite"


@pytest.fixture
def store(path: Path) -> Store:
    with Store(path) as opened:
        yield opened


def record(call_ref: str = "c1", **changes: object) -> CallRecordData:
    fields: dict[str, object] = {
        "call_ref": call_ref,
        "account": "alice",
        "a_call_id": f"{call_ref}-a@client",
        "b_call_id": None,
        "source": "198.51.100.7:5062",
        "transport": "UDP",
        "user_agent": "Zoiper rv2.10",
        "dialed": "17752180264",
        "sent_digits": None,
        "route": "carrier",
        "start_wall": 1_700_000_000.0,
    }
    fields.update(changes)
    return CallRecordData(**fields)  # type: ignore[arg-type]


def ladder_entry(
    wall: float, first_line: str, direction: str = "in", leg: str = "A"
) -> LadderEntry:
    return LadderEntry(
        wall=wall,
        direction=direction,
        leg=leg,
        peer="198.51.100.7:5062",
        transport="UDP",
        message=f"{first_line}\r\nCall-ID: c1-a@client\r\n\r\n",
    )


# -- schema and migrations ----------------------------------------------------


def test_new_file_gets_schema_wal_realm_secret_and_echo_route(path: Path) -> None:
    with Store(path) as store:
        assert store.realm == "sip.kx21.com"
        assert len(store.nonce_secret) == 32
        assert store.list_routes() == [Route(name=ECHO_ROUTE, host="echo")]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == _schema.SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"settings", "accounts", "routes", "calls", "call_media"} <= tables
    db.close()


def test_reopening_keeps_realm_and_secret_and_migration_is_idempotent(path: Path) -> None:
    with Store(path, realm="voice.example.net") as first:
        secret = first.nonce_secret
    with Store(path) as second:
        assert second.realm == "voice.example.net"
        assert second.nonce_secret == secret
    db = sqlite3.connect(path, isolation_level=None)
    assert _schema.migrate(db) == _schema.SCHEMA_VERSION
    assert _schema.schema_version(db) == _schema.SCHEMA_VERSION
    db.close()


def test_an_old_file_is_migrated_in_order_and_keeps_its_rows(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    assert _schema.migrate(db, target=1) == 0
    db.execute(
        "INSERT INTO accounts (username, ha1_md5, ha1_sha256, created, updated) "
        "VALUES ('old', 'x', 'y', 0, 0)"
    )
    db.close()
    with Store(path) as store:
        assert store.account_info("old") is not None
        store.write_call_record(record())  # the version-2 table exists now
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == _schema.SCHEMA_VERSION
    db.close()


def test_a_file_from_a_newer_kx_sipd_is_refused(path: Path) -> None:
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {_schema.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this kx-sipd"):
        Store(path)


# -- accounts and routes ------------------------------------------------------


def test_account_crud(store: Store) -> None:
    store.put_route(Route(name="carrier", host="203.0.113.5", transport=Transport.TCP))
    info = store.add_account(
        "alice",
        "s3cret",
        route="carrier",
        allowed_prefixes=["52", "1", "1"],
        max_calls=2,
        max_cps=0.5,
        caller_id="+15551230000",
        allowed_sources=["198.51.100.7/24", "2001:db8::1"],
    )
    assert info.status == "active"
    assert info.allowed_prefixes == ("1", "52")
    assert info.allowed_sources == ("198.51.100.0/24", "2001:db8::1/128")
    with pytest.raises(Conflict, match="already exists"):
        store.add_account("alice", "other")

    changed = store.update_account("alice", max_calls=None, caller_id=None, allowed_prefixes=())
    assert (changed.max_calls, changed.caller_id, changed.allowed_prefixes) == (None, None, ())
    assert changed.max_cps == 0.5  # not given, kept

    store.set_active("alice", False)
    assert store.account_info("alice").status == "suspended"  # type: ignore[union-attr]
    store.set_active("alice", True)
    assert [info.username for info in store.list_accounts()] == ["alice"]

    store.delete_account("alice")
    assert store.account_info("alice") is None
    assert store.get_account("alice") is None
    for operation in (
        lambda: store.delete_account("alice"),
        lambda: store.set_password("alice", "x"),
        lambda: store.set_active("alice", False),
        lambda: store.update_account("alice", max_calls=3),
    ):
        with pytest.raises(NotFound):
            operation()


@pytest.mark.parametrize(
    ("username", "options", "message"),
    [
        ("bad user", {}, "invalid username"),
        ("a" * 65, {}, "invalid username"),
        ("bob", {"route": "nowhere"}, "no route 'nowhere'"),
        ("bob", {"allowed_prefixes": ["+1"]}, "invalid destination prefix"),
        ("bob", {"allowed_sources": ["10.0.0.300"]}, "invalid source"),
        ("bob", {"caller_id": "john"}, "invalid caller ID"),
        ("bob", {"max_calls": 0}, "max calls"),
        ("bob", {"max_cps": -1.0}, "per second"),
    ],
)
def test_invalid_account_values_are_refused_with_a_reason(
    store: Store, username: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        store.add_account(username, "pw", **options)  # type: ignore[arg-type]
    assert store.list_accounts() == []


def test_empty_password_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="empty"):
        store.add_account("bob", "")


def test_ha1_follows_rfc_2617_for_the_databases_realm(tmp_path: Path) -> None:
    # RFC 2617 §3.5: Mufasa / testrealm@host.com / "Circle Of Life".
    with Store(tmp_path / "rfc.sqlite", realm="testrealm@host.com") as store:
        store.add_account("Mufasa", "Circle Of Life")
        account = store.get_account("Mufasa")
    assert account is not None
    assert account.ha1["MD5"] == "939e7578ed9e3c518a452acee763bce9"
    expected = hashlib.sha256(b"Mufasa:testrealm@host.com:Circle Of Life").hexdigest()
    assert account.ha1["SHA-256"] == expected


def test_get_account_resolves_the_route_and_reports_suspension(store: Store) -> None:
    store.put_route(
        Route(name="carrier", host="203.0.113.5", port=5080, transport=Transport.TCP, strip=1)
    )
    store.add_account("alice", "pw", route="carrier", allowed_prefixes=["1"], max_calls=3)
    account = store.get_account("alice")
    assert account is not None
    assert account.route == Route(
        name="carrier", host="203.0.113.5", port=5080, transport=Transport.TCP, strip=1
    )
    assert account.allowed_prefixes == ("1",)
    assert account.max_calls == 3
    assert account.active
    store.set_active("alice", False)
    suspended = store.get_account("alice")
    assert suspended is not None and not suspended.active
    store.put_route(Route(name="carrier", host="203.0.113.9"), replace=True)
    assert store.get_account("alice").route.host == "203.0.113.9"  # type: ignore[union-attr]


def test_routes_crud_and_the_built_in_echo_route(store: Store) -> None:
    route = Route(name="carrier", host="203.0.113.5", strip=1, prefix="00")
    store.put_route(route)
    assert store.get_route("carrier") == route
    with pytest.raises(Conflict, match="already exists"):
        store.put_route(route)
    with pytest.raises(StoreError, match="built in"):
        store.put_route(Route(name=ECHO_ROUTE, host="x"), replace=True)
    with pytest.raises(StoreError, match="built in"):
        store.delete_route(ECHO_ROUTE)
    with pytest.raises(StoreError, match="invalid prefix"):
        store.put_route(Route(name="x", host="h", prefix="ab"))
    with pytest.raises(StoreError, match="invalid route name"):
        store.put_route(Route(name="-x", host="h"))
    store.add_account("alice", "pw", route="carrier")
    with pytest.raises(Conflict, match="used by accounts: alice"):
        store.delete_route("carrier")
    store.update_account("alice", route=None)
    store.delete_route("carrier")
    assert store.get_route("carrier") is None
    with pytest.raises(NotFound):
        store.delete_route("carrier")


# -- cache and realm ------------------------------------------------------------


def test_a_change_by_another_connection_is_seen_by_the_next_lookup(path: Path) -> None:
    with Store(path) as server, Store(path) as cli:
        cli.add_account("alice", "old")
        before = server.get_account("alice")
        assert server.get_account("alice") is before  # served from the cache
        cli.set_password("alice", "new")
        after = server.get_account("alice")
        assert after is not None and after != before
        assert after.ha1["MD5"] == hashlib.md5(b"alice:sip.kx21.com:new").hexdigest()
        cli.put_route(Route(name="carrier", host="203.0.113.5"))
        cli.update_account("alice", route="carrier")
        assert server.get_account("alice").route.name == "carrier"  # type: ignore[union-attr]
        cli.delete_account("alice")
        assert server.get_account("alice") is None


def test_a_change_by_the_cli_in_another_process_is_seen_at_once(path: Path) -> None:
    with Store(path) as server:
        server.add_account("alice", "old")
        assert server.get_account("alice") is not None
        subprocess.run(
            [
                sys.executable,
                "-m",
                "kx_sipd",
                "accounts",
                "passwd",
                "alice",
                "--password",
                "new",
                "--db",
                str(path),
            ],
            check=True,
            capture_output=True,
            cwd=REPO,
            timeout=60,
        )
        account = server.get_account("alice")
        assert account is not None
        assert account.ha1["MD5"] == hashlib.md5(b"alice:sip.kx21.com:new").hexdigest()


def test_call_record_writes_do_not_drop_the_account_cache(path: Path) -> None:
    with Store(path) as server, Store(path) as other:
        server.add_account("alice", "pw")
        cached = server.get_account("alice")
        other.write_call_record(record("elsewhere"))
        assert server.get_account("alice") is cached
        server.write_call_record(record("here"))
        server.attach_media_stats("here", MediaStats(), None)
        assert server.get_account("alice") is cached


def test_realm_mismatch_is_a_distinct_error(path: Path) -> None:
    Store(path, realm="sip.kx21.com").close()
    with pytest.raises(RealmMismatch, match=re.escape("'sip.kx21.com', not 'other.example'")):
        Store(path, realm="other.example")
    with Store(path, realm="sip.kx21.com") as same:
        assert same.realm == "sip.kx21.com"


def test_a_realm_that_cannot_be_quoted_is_refused(path: Path) -> None:
    with pytest.raises(StoreError, match="invalid realm"):
        Store(path, realm='bad"realm')
    assert not path.exists()


# -- failures and recovery ------------------------------------------------------


def test_a_corrupt_file_is_store_unavailable(path: Path) -> None:
    path.write_bytes(b"this is not a database, just text" * 200)
    with pytest.raises(StoreUnavailable, match="not a database"):
        Store(path)


def test_an_unopenable_path_is_store_unavailable(tmp_path: Path) -> None:
    directory = tmp_path / "dir.sqlite"
    directory.mkdir()
    with pytest.raises(StoreUnavailable):
        Store(directory)
    with pytest.raises(StoreUnavailable):
        Store(tmp_path / "missing" / "kx.sqlite")


def test_a_missing_file_is_not_created_when_create_is_false(path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        Store(path, create=False)
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_store_unavailable(path: Path) -> None:
    Store(path).close()
    path.chmod(0)
    try:
        with pytest.raises(StoreUnavailable):
            Store(path)
    finally:
        path.chmod(0o600)


def test_a_write_locked_past_the_timeout_fails_fast_then_recovers(store: Store) -> None:
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable, match="locked"):
        store.write_call_record(record())
    locker.execute("ROLLBACK")
    locker.close()
    store.write_call_record(record())
    assert [entry.record.call_ref for entry in store.list_calls()] == ["c1"]


def test_a_locked_file_makes_lookups_unavailable_even_when_cached_then_recovers(
    store: Store,
) -> None:
    store.add_account("alice", "pw")
    assert store.get_account("alice") is not None
    store.close()  # the exclusive lock below needs every other connection gone
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreUnavailable, match="locked"):
        store.get_account("alice")
    with pytest.raises(StoreUnavailable):
        store.list_accounts()
    locker.execute("COMMIT")
    locker.close()
    assert store.get_account("alice") is not None


def test_a_database_deleted_under_a_running_store_is_not_recreated(path: Path) -> None:
    with Store(path) as store:
        store.add_account("alice", "pw")
        store.close()
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
        with pytest.raises(StoreUnavailable):
            store.get_account("alice")
        assert not path.exists()


def test_many_threads_share_one_store_and_concurrent_writes_all_land(store: Store) -> None:
    # 8 writers at once would queue on SQLite's lock one fsync each and outlast
    # busy_timeout; the group commit makes them share transactions instead.
    store.add_account("alice", "pw")

    def work(index: int) -> str | None:
        account = store.get_account("alice")
        store.write_call_record(record(f"c{index}"))
        store.attach_media_stats(f"c{index}", MediaStats(packets_in=index), None)
        return None if account is None else threading.current_thread().name

    with ThreadPoolExecutor(max_workers=8) as pool:
        names = list(pool.map(work, range(160)))
    assert None not in names
    entries = store.list_calls(limit=None)
    assert len(entries) == 160
    assert all(entry.a_media.packets_in == int(entry.record.call_ref[1:]) for entry in entries)  # type: ignore[union-attr]


# -- call records ---------------------------------------------------------------


def test_records_are_upserted_and_media_stats_attached(store: Store) -> None:
    started = record(ladder=(ladder_entry(1_700_000_000.1, "INVITE sip:17752180264@x SIP/2.0"),))
    store.write_call_record(started)
    ended = record(
        b_call_id="b-leg@kx",
        sent_digits="7752180264",
        answer_wall=1_700_000_002.0,
        end_wall=1_700_000_012.5,
        final_status=200,
        ended_by="client",
        reason="BYE from the client",
        codec="PCMU",
        ladder=(
            *started.ladder,
            ladder_entry(1_700_000_012.5, "BYE sip:kx SIP/2.0"),
        ),
    )
    store.write_call_record(ended)
    stats_a = MediaStats(packets_in=500, packets_out=498, bytes_in=86000, jitter_ms=1.5)
    store.attach_media_stats("c1", stats_a, None)
    (entry,) = store.list_calls()
    assert entry.record == ended
    assert entry.record.billable == 11
    assert entry.a_media == stats_a
    assert entry.b_media is None


def test_a_batch_is_written_in_order_in_one_transaction_or_not_at_all(store: Store) -> None:
    started, ended = record("c1"), record("c1", end_wall=1_700_000_010.0, final_status=200)
    stats = MediaStats(packets_in=7)
    store.write_batch([started, record("c2"), ("c1", stats, None), ended])
    entries = {entry.record.call_ref: entry for entry in store.list_calls(limit=None)}
    assert entries["c1"].record == ended  # the later write of the same call wins
    assert entries["c1"].a_media == stats
    assert entries["c2"].record == record("c2")
    # A batch whose item is refused leaves nothing of itself behind.
    with pytest.raises(StoreUnavailable):
        store.write_batch([record("c3"), record("c4", start_wall=object())])  # not bindable
    assert {entry.record.call_ref for entry in store.list_calls(limit=None)} == {"c1", "c2"}


def test_media_stats_may_arrive_before_the_record(store: Store) -> None:
    store.attach_media_stats("c9", None, MediaStats(packets_in=3))
    assert store.list_calls() == []
    store.write_call_record(record("c9"))
    (entry,) = store.list_calls()
    assert entry.b_media == MediaStats(packets_in=3)


def test_call_queries_filter_by_account_time_and_call_id(store: Store) -> None:
    store.write_call_record(record("c1", start_wall=100.0))
    store.write_call_record(record("c2", start_wall=200.0, account="bob", b_call_id="b2@kx"))
    store.write_call_record(record("c3", start_wall=300.0))

    def refs(**query: object) -> list[str]:
        return [entry.record.call_ref for entry in store.list_calls(**query)]  # type: ignore[arg-type]

    assert refs() == ["c3", "c2", "c1"]
    assert refs(account="alice") == ["c3", "c1"]
    assert refs(since=200.0) == ["c3", "c2"]
    assert refs(until=200.0) == ["c1"]
    assert refs(since=150.0, until=250.0) == ["c2"]
    assert refs(call_id="c1-a@client") == ["c1"]
    assert refs(call_id="b2@kx") == ["c2"]
    assert refs(call_id="c3") == ["c3"]
    assert refs(limit=1) == ["c3"]
    assert refs(account="nobody") == []


def test_recover_unfinished_closes_open_records_at_their_last_known_time(store: Store) -> None:
    store.write_call_record(record("plain", start_wall=100.0))
    store.write_call_record(record("answered", start_wall=100.0, answer_wall=103.0))
    store.write_call_record(
        record("laddered", start_wall=100.0, ladder=(ladder_entry(107.25, "ACK sip:x SIP/2.0"),))
    )
    store.write_call_record(record("done", start_wall=100.0, end_wall=150.0, ended_by="client"))
    assert store.recover_unfinished(1000.0) == 3
    ends = {entry.record.call_ref: entry.record for entry in store.list_calls()}
    assert ends["plain"].end_wall == 100.0
    assert ends["answered"].end_wall == 103.0
    assert ends["laddered"].end_wall == 107.25
    assert ends["done"].end_wall == 150.0 and ends["done"].ended_by == "client"
    for name in ("plain", "answered", "laddered"):
        assert ends[name].ended_by == "restart"
        assert ends[name].reason == "server restarted while the call was up"
    assert store.recover_unfinished(1000.0) == 0


def test_a_damaged_ladder_does_not_hide_the_record(store: Store) -> None:
    store.write_call_record(record())
    db = sqlite3.connect(store.path)
    db.execute("UPDATE calls SET ladder = 'not json'")
    db.commit()
    db.close()
    (entry,) = store.list_calls()
    assert entry.record.ladder == ()


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_a_record_survives_a_kill_right_after_the_write(path: Path, synchronous: str) -> None:
    Store(path).close()
    script = textwrap.dedent(
        f"""
        import os, signal
        from kx_sipd.store import Store
        from sansio_sip import CallRecordData, LadderEntry
        store = Store({str(path)!r}, synchronous={synchronous!r})
        store.write_call_record(CallRecordData(
            call_ref="killed", account="alice", a_call_id="k@client", b_call_id=None,
            source="198.51.100.7:5062", transport="UDP", user_agent="ua", dialed="1555",
            sent_digits=None, route=None, start_wall=5.0, end_wall=9.0, ended_by="client",
            ladder=(LadderEntry(wall=9.0, direction="in", leg="A", peer="198.51.100.7:5062",
                                transport="UDP", message="BYE sip:x SIP/2.0"),),
        ))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    with Store(path) as reopened:
        (entry,) = reopened.list_calls()
    assert entry.record.call_ref == "killed"
    assert entry.record.end_wall == 9.0
    assert entry.record.ladder[0].message == "BYE sip:x SIP/2.0"


def test_a_refused_write_leaves_nothing_half_written(store: Store) -> None:
    store.write_call_record(record(end_wall=None))
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable):
        store.write_call_record(record(end_wall=200.0, ended_by="client"))
    locker.execute("ROLLBACK")
    locker.close()
    (entry,) = store.list_calls()
    assert entry.record.end_wall is None


def test_the_stored_ladder_holds_every_field_of_an_entry() -> None:
    """record_values writes each ladder entry field by field; a field added to
    LadderEntry and not written would be lost from every record."""
    from kx_sipd._rows import _ladder_dict

    entry = ladder_entry(1_700_000_000.1, "INVITE sip:1@x SIP/2.0")
    assert _ladder_dict(entry) == attrs.asdict(entry)
    assert set(_ladder_dict(entry)) == {field.name for field in attrs.fields(LadderEntry)}
