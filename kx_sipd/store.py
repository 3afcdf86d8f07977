"""The operator's store: accounts, routes and call records in one SQLite file.

``Store`` implements ``sansio_sip.AccountStore`` for the drivers and the
queries and edits behind ``kx-sipd accounts|routes|calls``. This module owns
connections, transactions, the cache and failure handling; the schema is in
``_schema.py``, input checks, SQL and row conversions in ``_rows.py``.

Theory of operation:

* **One file, versioned schema** (``_schema.py``), WAL journal so readers never
  wait for the writer. Credentials are stored as HA1 (MD5 and SHA-256) for the
  database's realm, never as passwords; the realm is therefore a property of
  the file, fixed when it is created, and opening it for another realm raises
  ``RealmMismatch``. The nonce secret is made once (``os.urandom(32)``) and
  stored, so every process and host using the file signs nonces alike.
* **Durability.** ``synchronous=FULL`` by default: in WAL mode a commit is
  fsynced before ``write_call_record`` returns, so a record survives a
  process kill *and* a power cut. ``synchronous="NORMAL"`` skips that fsync:
  still safe against a killed process (the WAL is in the OS page cache), but a
  power loss may drop the commits since the last checkpoint.
* **Failures.** ``busy_timeout`` is 200 ms, so a locked file becomes
  ``StoreUnavailable`` (503 for the caller) quickly instead of stalling the
  server. Every sqlite3 error on the serving path is turned into
  ``StoreUnavailable``; the failing connection is closed and the next call
  opens a new one, so the server recovers as soon as the file does. A
  connection re-opened later never creates the file: a deleted database must
  answer 503, not "unknown user" from a fresh empty one.
* **Connections.** A small pool, not one per thread: a caller borrows an
  idle connection (the most recently returned, whose cache is warm) or opens
  one, and gives it back when done; at most ``_IDLE_CONNECTIONS`` are kept
  idle, the others are closed. So the number open follows how many threads
  use the store *at once*, not how many threads ever did: AnyIO's worker
  threads come and go (an idle one exits after 10 s), and one connection per
  thread meant a new connection for every new thread, while the old one, never
  closed, waited for the cyclic garbage collector (a ``sqlite3.Connection``
  references itself through its statement cache), with its file descriptors,
  page cache and statements: the soak's memory and descriptors grew with
  thread turnover (docs/robustness.md). A connection is used by one thread at
  a time.
* **Account cache.** ``get_account`` is on the hot path (every REGISTER and
  INVITE). Accounts are cached in memory; before each look-up the thread's
  connection reads ``PRAGMA data_version``, which changes when any *other*
  connection committed. Only then is the ``generation`` counter (bumped by
  triggers on accounts and routes) read, and the cache dropped if it moved;
  so a password changed by the CLI in another process is seen by the very
  next request, and call-record writes do not flush the cache.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final

from sansio_sip import (
    Account,
    CallRecordData,
    MediaStats,
    Route,
    StoreUnavailable,
    compute_ha1,
)

from ._rows import (
    ACCOUNT_FIELDS,
    ACCOUNT_QUERY,
    CALL_QUERY,
    ECHO_ROUTE,
    INFO_QUERY,
    REALM,
    ROUTE_QUERY,
    UPSERT_CALL,
    UPSERT_MEDIA,
    AccountInfo,
    CallEntry,
    Conflict,
    NotFound,
    RealmMismatch,
    StoreError,
    account_fields,
    account_from_row,
    call_from_row,
    check_route,
    check_route_exists,
    check_username,
    info_from_row,
    ladder_from_json,
    record_values,
    route_from_row,
    row_exists,
    stats_json,
)
from ._schema import SCHEMA_VERSION, SchemaTooNew, migrate
from .settings import DEFAULT_REALM

__all__ = [
    "ECHO_ROUTE",
    "AccountInfo",
    "CallEntry",
    "Conflict",
    "MediaStatsWrite",
    "NotFound",
    "RealmMismatch",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "compute_ha1",
]

BUSY_TIMEOUT: Final = 0.2
"""Seconds to wait for a lock before giving up: long enough to ride out a
checkpoint or a CLI edit, short enough that a stuck lock becomes a prompt 503."""

_IDLE_CONNECTIONS: Final = 4
"""Connections kept open while unused: the loop's look-ups and a few worker
threads' record writes at once; a burst past it opens more, closed when returned."""

_CACHE_KIB: Final = 512
"""SQLite page cache per connection (KiB; SQLite's default is 2,000). Enough for
what the server touches: the interior pages of the accounts table and the
right-hand edge of the calls table and its indexes, where records are appended.
The default let each pooled connection's cache grow with the record file for
its first ~2 MB: memory that looked like a leak in a soak."""

_CACHE_LIMIT: Final = 50_000
"""Cached look-ups (unknown usernames included, which an attacker chooses).
Past it the cache is dropped whole: simple, bounded, and it refills itself."""


class _Connection:
    """A pooled connection and the last ``data_version`` it saw."""

    __slots__ = ("data_version", "db")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.data_version: int | None = None


MediaStatsWrite = tuple[str, MediaStats | None, MediaStats | None]
"""``(call_ref, a_leg, b_leg)``: what ``attach_media_stats`` takes, as one item of
``write_batch``."""


class _PendingWrite:
    """Statements waiting for their group commit (all in it, in order)."""

    __slots__ = ("done", "error", "statements")

    def __init__(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        self.statements = statements
        self.done = False
        self.error: StoreUnavailable | None = None


def _media_statement(
    call_ref: str, a_leg: MediaStats | None, b_leg: MediaStats | None
) -> tuple[str, tuple[Any, ...]]:
    return UPSERT_MEDIA, (call_ref, stats_json(a_leg), stats_json(b_leg), time.time())


class Store:
    """Accounts, routes and call records in the SQLite file at ``path``.

    ``realm``: the realm to create a new file with (default sip.kx21.com), or
    the realm an existing file must have (else ``RealmMismatch``). ``create``:
    make the file when missing (else ``StoreUnavailable``). Raises
    ``StoreUnavailable`` when the file cannot be opened or read, and
    ``StoreError`` when its schema is newer than this code.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        realm: str | None = None,
        create: bool = True,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        if realm is not None and not REALM.fullmatch(realm):
            raise StoreError(f"invalid realm {realm!r}: printable ASCII without quotes")
        self.path = os.path.abspath(os.fspath(path))
        self._synchronous = synchronous
        self._connections: set[_Connection] = set()  # open: idle or borrowed
        self._idle: list[_Connection] = []  # last returned at the end
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # held by the thread committing a group
        self._pending: list[_PendingWrite] = []
        self._cache: dict[str, Account | None] = {}
        self._epoch = 0  # bumped whenever the cache is dropped
        self._generation: object = None  # the settings' generation the cache matches
        holder = self._open(create=create)
        try:
            if holder.db.execute("PRAGMA journal_mode").fetchall()[0][0] != "wal":
                holder.db.execute("PRAGMA journal_mode = WAL").fetchall()
            migrate(holder.db)
            self.realm, self.nonce_secret = self._init_settings(holder.db, realm)
        except SchemaTooNew as exc:
            self._discard(holder)
            raise StoreError(f"{self.path}: {exc}") from None
        except sqlite3.Error as exc:
            self._discard(holder)
            raise StoreUnavailable(f"{self.path}: {exc}") from exc
        except StoreError:
            self._discard(holder)
            raise
        self._give_back(holder)

    # -- connections ---------------------------------------------------------

    def _open(self, *, create: bool) -> _Connection:
        mode = "rwc" if create else "rw"
        uri = f"file:{urllib.parse.quote(self.path)}?mode={mode}"
        try:
            db = sqlite3.connect(
                uri,
                uri=True,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,
                check_same_thread=False,  # used by one thread; closed by close()
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        holder = _Connection(db)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
            db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        except sqlite3.Error as exc:
            db.close()
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        with self._lock:
            self._connections.add(holder)
        return holder

    def _borrow(self) -> _Connection:
        """An idle connection (the warmest), or a new one; ``_give_back`` it after use."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._open(create=False)

    def _give_back(self, holder: _Connection) -> None:
        with self._lock:
            if holder not in self._connections:
                return  # discarded after an error, or closed by close()
            if len(self._idle) < _IDLE_CONNECTIONS:
                self._idle.append(holder)
                return
            self._connections.discard(holder)
        with suppress(sqlite3.Error):  # a surplus connection: closing is best effort
            holder.db.close()

    def _discard(self, holder: _Connection) -> None:
        """Close a connection after an error; the next caller opens a new one."""
        with self._lock:
            self._connections.discard(holder)
        with suppress(sqlite3.Error):  # it is being discarded because it is broken
            holder.db.close()

    def _fail(self, holder: _Connection, exc: sqlite3.Error) -> StoreUnavailable:
        self._discard(holder)
        return StoreUnavailable(f"{self.path}: {exc}")

    def close(self) -> None:
        """Close every connection this store opened (idle or in use by any
        thread); a later call opens new ones."""
        with self._lock:
            holders = list(self._connections)
            self._connections.clear()
            self._idle.clear()
        for holder in holders:
            with suppress(sqlite3.Error):  # closing is best effort
                holder.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        holder = self._borrow()
        try:
            yield holder.db
        except sqlite3.Error as exc:
            raise self._fail(holder, exc) from exc
        finally:
            self._give_back(holder)

    @contextmanager
    def _writing(self, *, drop_cache: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or nothing. This connection's own
        commits do not change its data_version, so an edit of accounts or
        routes drops the cache here."""
        holder = self._borrow()
        db = holder.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise Conflict(str(exc)) from exc
        except sqlite3.Error as exc:
            raise self._fail(holder, exc) from exc
        finally:
            self._give_back(holder)
            if drop_cache:
                self._drop_cache()

    def _init_settings(self, db: sqlite3.Connection, realm: str | None) -> tuple[str, bytes]:
        db.execute("BEGIN IMMEDIATE")
        try:
            insert = "INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)"
            db.execute(insert, ("realm", realm or DEFAULT_REALM))
            db.execute(insert, ("nonce_secret", os.urandom(32).hex()))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        rows = dict(db.execute("SELECT name, value FROM settings").fetchall())
        stored_realm = str(rows["realm"])
        if realm is not None and realm != stored_realm:
            raise RealmMismatch(
                f"{self.path} holds accounts for realm {stored_realm!r}, not {realm!r}; "
                "the stored credentials (HA1) only work for the realm they were made for: "
                f"use --realm {stored_realm} or another database"
            )
        return stored_realm, bytes.fromhex(str(rows["nonce_secret"]))

    @property
    def schema_version(self) -> int:
        """The schema version this store migrated the file to."""
        return SCHEMA_VERSION

    # -- AccountStore --------------------------------------------------------

    def get_account(self, username: str) -> Account | None:
        """The account (HA1 for the store's realm, route resolved), or None.
        Raises StoreUnavailable."""
        holder = self._borrow()
        db = holder.db
        try:
            version = db.execute("PRAGMA data_version").fetchall()[0][0]
            if version != holder.data_version:
                holder.data_version = version
                generation = db.execute(
                    "SELECT value FROM settings WHERE name = 'generation'"
                ).fetchall()[0][0]
                with self._lock:
                    if generation != self._generation:
                        self._cache.clear()
                        self._epoch += 1
                        self._generation = generation
            with self._lock:
                epoch = self._epoch
                if username in self._cache:
                    return self._cache[username]
            rows = db.execute(ACCOUNT_QUERY, (username,)).fetchall()
        except sqlite3.Error as exc:
            raise self._fail(holder, exc) from exc
        finally:
            self._give_back(holder)
        account = account_from_row(rows[0]) if rows else None
        with self._lock:
            # A look-up that raced with a cache drop may hold old data: keep it out.
            if self._epoch == epoch:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[username] = account
        return account

    def write_call_record(self, record: CallRecordData) -> None:
        """Insert or update the record (by call_ref); durable when it returns
        (see the module docs). Raises StoreUnavailable."""
        self._commit_grouped([(UPSERT_CALL, record_values(record))])

    def attach_media_stats(
        self, call_ref: str, a_leg: MediaStats | None, b_leg: MediaStats | None
    ) -> None:
        """Store the relay's final per-leg figures for a call. Raises StoreUnavailable."""
        self._commit_grouped([_media_statement(call_ref, a_leg, b_leg)])

    def write_batch(self, writes: Sequence[CallRecordData | MediaStatsWrite]) -> None:
        """``write_call_record`` / ``attach_media_stats`` for each item, in order,
        in one transaction: all durable when it returns, or none written
        (StoreUnavailable). For a driver's writer thread, which has many writes
        at once and no concurrent caller to share a commit with: a commit
        (its fsync) costs ~250 us of CPU here, a statement in a shared one ~50."""
        self._commit_grouped(
            [
                (UPSERT_CALL, record_values(item))
                if isinstance(item, CallRecordData)
                else _media_statement(*item)
                for item in writes
            ]
        )

    def _commit_grouped(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Group commit: the first thread to get the write lock commits every
        write queued meanwhile in one transaction (one fsync), and the others
        find theirs done. Without it, concurrent writers queue on SQLite's own
        lock one fsync at a time, and a burst outlasts busy_timeout."""
        write = _PendingWrite(statements)
        with self._lock:
            self._pending.append(write)
        with self._write_lock:
            if not write.done:
                with self._lock:
                    batch, self._pending = self._pending, []
                error: StoreUnavailable | None = None
                try:
                    with self._writing(drop_cache=False) as db:
                        for item in batch:
                            for statement, values in item.statements:
                                db.execute(statement, values)
                except StoreUnavailable as exc:
                    error = exc
                except Conflict as exc:
                    error = StoreUnavailable(f"a call record write was refused: {exc}")
                for item in batch:
                    item.error, item.done = error, True
        if write.error is not None:
            raise write.error

    def _drop_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._epoch += 1

    # -- call records --------------------------------------------------------

    def recover_unfinished(self, now_wall: float) -> int:
        """Close the records a previous run left open (``end_wall`` NULL): ended
        by "restart" at the last time the record shows (its last ladder entry,
        else its answer or start), never later than ``now_wall``. Returns how
        many. Run once at server start, before taking calls. Raises StoreUnavailable."""
        with self._writing() as db:
            rows = db.execute(
                "SELECT call_ref, start_wall, answer_wall, ladder FROM calls WHERE end_wall IS NULL"
            ).fetchall()
            for call_ref, start_wall, answer_wall, ladder_json in rows:
                last = max(start_wall, answer_wall or start_wall)
                for entry in ladder_from_json(ladder_json):
                    last = max(last, entry.wall)
                db.execute(
                    "UPDATE calls SET end_wall = ?, ended_by = 'restart', "
                    "reason = 'server restarted while the call was up', updated_wall = ? "
                    "WHERE call_ref = ?",
                    (min(last, now_wall), now_wall, call_ref),
                )
        return len(rows)

    def list_calls(
        self,
        *,
        account: str | None = None,
        since: float | None = None,
        until: float | None = None,
        call_id: str | None = None,
        limit: int | None = 100,
    ) -> list[CallEntry]:
        """Records, newest first, filtered by account, start time in
        [since, until), and Call-ID of either leg (or call_ref). Raises StoreUnavailable."""
        where: list[str] = []
        params: list[Any] = []
        if account is not None:
            where.append("c.account = ?")
            params.append(account)
        if since is not None:
            where.append("c.start_wall >= ?")
            params.append(since)
        if until is not None:
            where.append("c.start_wall < ?")
            params.append(until)
        if call_id is not None:
            where.append("(c.a_call_id = ? OR c.b_call_id = ? OR c.call_ref = ?)")
            params.extend((call_id, call_id, call_id))
        sql = CALL_QUERY
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY c.start_wall DESC, c.call_ref"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._reading() as db:
            rows = db.execute(sql, params).fetchall()
        return [call_from_row(row) for row in rows]

    # -- accounts (operator) -------------------------------------------------

    def add_account(
        self,
        username: str,
        password: str,
        *,
        route: str | None = None,
        allowed_prefixes: Sequence[str] = (),
        max_calls: int | None = None,
        max_cps: float | None = None,
        caller_id: str | None = None,
        allowed_sources: Sequence[str] = (),
    ) -> AccountInfo:
        """Create an account. Raises StoreError (bad value, duplicate, unknown
        route), StoreUnavailable."""
        check_username(username)
        fields = account_fields(
            route=route,
            allowed_prefixes=allowed_prefixes,
            max_calls=max_calls,
            max_cps=max_cps,
            caller_id=caller_id,
            allowed_sources=allowed_sources,
        )
        md5, sha256 = self._ha1s(username, password)
        now = time.time()
        with self._writing() as db:
            if row_exists(db, "accounts", "username", username):
                raise Conflict(f"account {username!r} already exists")
            check_route_exists(db, route)
            db.execute(
                "INSERT INTO accounts (username, ha1_md5, ha1_sha256, status, route, "
                "allowed_prefixes, max_calls, max_cps, caller_id, allowed_sources, "
                "created, updated) VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?)",
                (username, md5, sha256, *fields.values(), now, now),
            )
        return self._require_account(username)

    def update_account(self, username: str, **changes: Any) -> AccountInfo:
        """Change some of: route, allowed_prefixes, max_calls, max_cps,
        caller_id, allowed_sources (None clears a limit, the route or the caller
        ID). Raises StoreError, StoreUnavailable."""
        unknown = set(changes) - set(ACCOUNT_FIELDS)
        if unknown:
            raise TypeError(f"unknown account fields: {', '.join(sorted(unknown))}")
        fields = account_fields(**changes)
        with self._writing() as db:
            if not row_exists(db, "accounts", "username", username):
                raise NotFound(f"no account {username!r}")
            if "route" in fields:
                check_route_exists(db, fields["route"])
            if fields:
                assignments = ", ".join(f"{name} = ?" for name in fields)
                db.execute(
                    f"UPDATE accounts SET {assignments}, updated = ? WHERE username = ?",
                    (*fields.values(), time.time(), username),
                )
        return self._require_account(username)

    def set_password(self, username: str, password: str) -> None:
        """Replace the account's credentials. Raises StoreError, StoreUnavailable."""
        md5, sha256 = self._ha1s(username, password)
        self._update_one(
            username, "ha1_md5 = ?, ha1_sha256 = ?", (md5, sha256), f"no account {username!r}"
        )

    def set_active(self, username: str, active: bool) -> None:
        """Suspend (calls get 403 Unknown user) or resume an account."""
        status = "active" if active else "suspended"
        self._update_one(username, "status = ?", (status,), f"no account {username!r}")

    def delete_account(self, username: str) -> None:
        """Remove an account (its call records stay). Raises NotFound, StoreUnavailable."""
        with self._writing() as db:
            if db.execute("DELETE FROM accounts WHERE username = ?", (username,)).rowcount == 0:
                raise NotFound(f"no account {username!r}")

    def account_info(self, username: str) -> AccountInfo | None:
        """The operator's view of one account, or None."""
        with self._reading() as db:
            rows = db.execute(INFO_QUERY + " WHERE username = ?", (username,)).fetchall()
        return info_from_row(rows[0]) if rows else None

    def list_accounts(self) -> list[AccountInfo]:
        """Every account, by username."""
        with self._reading() as db:
            rows = db.execute(INFO_QUERY + " ORDER BY username").fetchall()
        return [info_from_row(row) for row in rows]

    def _require_account(self, username: str) -> AccountInfo:
        info = self.account_info(username)
        if info is None:
            raise NotFound(f"no account {username!r}")
        return info

    def _update_one(
        self, username: str, assignments: str, values: tuple[Any, ...], missing: str
    ) -> None:
        with self._writing() as db:
            cursor = db.execute(
                f"UPDATE accounts SET {assignments}, updated = ? WHERE username = ?",
                (*values, time.time(), username),
            )
            if cursor.rowcount == 0:
                raise NotFound(missing)

    def _ha1s(self, username: str, password: str) -> tuple[str, str]:
        if not password:
            raise StoreError("the password must not be empty")
        return (
            compute_ha1(username, self.realm, password, "MD5"),
            compute_ha1(username, self.realm, password, "SHA-256"),
        )

    # -- routes (operator) ---------------------------------------------------

    def put_route(self, route: Route, *, replace: bool = False) -> Route:
        """Create a route, or with ``replace`` create or change it. The built-in
        ``echo`` route cannot be changed. Raises StoreError, StoreUnavailable."""
        check_route(route)
        now = time.time()
        with self._writing() as db:
            exists = row_exists(db, "routes", "name", route.name)
            if exists and not replace:
                raise Conflict(f"route {route.name!r} already exists (use `routes set`)")
            values = (
                route.host,
                route.port,
                route.transport.value.lower(),
                route.strip,
                route.prefix,
                now,
                route.name,
            )
            if exists:
                db.execute(
                    "UPDATE routes SET host = ?, port = ?, transport = ?, strip = ?, "
                    "prefix = ?, updated = ? WHERE name = ?",
                    values,
                )
            else:
                db.execute(
                    "INSERT INTO routes (host, port, transport, strip, prefix, updated, name, "
                    "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, now),
                )
        return route

    def delete_route(self, name: str) -> None:
        """Remove a route no account uses. Raises StoreError, StoreUnavailable."""
        if name == ECHO_ROUTE:
            raise StoreError("the echo route is built in and cannot be deleted")
        with self._writing() as db:
            users = [
                row[0]
                for row in db.execute(
                    "SELECT username FROM accounts WHERE route = ? ORDER BY username LIMIT 6",
                    (name,),
                ).fetchall()
            ]
            if users:
                shown = ", ".join(users[:5]) + (", ..." if len(users) > 5 else "")
                raise Conflict(f"route {name!r} is used by accounts: {shown}")
            if db.execute("DELETE FROM routes WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no route {name!r}")

    def get_route(self, name: str) -> Route | None:
        """One route, or None."""
        with self._reading() as db:
            rows = db.execute(ROUTE_QUERY + " WHERE name = ?", (name,)).fetchall()
        return route_from_row(rows[0]) if rows else None

    def list_routes(self) -> list[Route]:
        """Every route, by name."""
        with self._reading() as db:
            rows = db.execute(ROUTE_QUERY + " ORDER BY name").fetchall()
        return [route_from_row(row) for row in rows]
