"""The SQLite schema of the store and its ordered migrations.

The schema version is ``PRAGMA user_version``: 0 is an empty file, N means
migrations 1..N have run. Each migration is a tuple of single SQL statements
run in one ``BEGIN IMMEDIATE`` transaction together with the version bump, so a
crash mid-migration leaves the previous version intact, and two processes
opening a new file at once do not both migrate (the second one re-reads the
version under the write lock and finds nothing to do).

Append new migrations at the end; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SchemaTooNew", "migrate", "schema_version"]

_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
"""Wall-clock seconds since the epoch, in SQL (for rows a migration creates)."""


def _bump_generation(table: str, event: str) -> str:
    # Any change to accounts or routes bumps one counter; a Store's account
    # cache compares it when PRAGMA data_version says some other connection
    # committed, so call-record writes do not flush the cache (see store.py).
    return (
        f"CREATE TRIGGER {table}_{event.lower()}_generation AFTER {event} ON {table} "
        "BEGIN UPDATE settings SET value = value + 1 WHERE name = 'generation'; END"
    )


_V1_ACCOUNTS_AND_ROUTES = (
    # name/value pairs: realm, nonce_secret (hex), generation. The value column
    # has no declared type so integers stay integers.
    "CREATE TABLE settings (name TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID",
    "INSERT INTO settings (name, value) VALUES ('generation', 0)",
    """CREATE TABLE routes (
        name TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        transport TEXT NOT NULL CHECK (transport IN ('udp', 'tcp')),
        strip INTEGER NOT NULL DEFAULT 0 CHECK (strip >= 0),
        prefix TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    # The echo test is a built-in route: calls on it are answered by kx-sipd itself.
    f"""INSERT INTO routes (name, host, port, transport, strip, prefix, created, updated)
        VALUES ('echo', 'echo', 5060, 'udp', 0, '', {_NOW}, {_NOW})""",
    """CREATE TABLE accounts (
        username TEXT PRIMARY KEY,
        ha1_md5 TEXT NOT NULL,
        ha1_sha256 TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
        route TEXT REFERENCES routes (name) ON UPDATE CASCADE ON DELETE RESTRICT,
        allowed_prefixes TEXT NOT NULL DEFAULT '[]',
        max_calls INTEGER CHECK (max_calls > 0),
        max_cps REAL CHECK (max_cps > 0),
        caller_id TEXT,
        allowed_sources TEXT NOT NULL DEFAULT '[]',
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    "CREATE INDEX accounts_route ON accounts (route)",
    *(
        _bump_generation(table, event)
        for table in ("accounts", "routes")
        for event in ("INSERT", "UPDATE", "DELETE")
    ),
)

_V2_CALL_RECORDS = (
    # One row per call, upserted by call_ref. ``account`` is not a foreign key:
    # records outlive the accounts they were made for.
    """CREATE TABLE calls (
        call_ref TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        a_call_id TEXT NOT NULL,
        b_call_id TEXT,
        source TEXT NOT NULL,
        transport TEXT NOT NULL,
        user_agent TEXT NOT NULL,
        dialed TEXT NOT NULL,
        sent_digits TEXT,
        route TEXT,
        start_wall REAL NOT NULL,
        answer_wall REAL,
        end_wall REAL,
        final_status INTEGER,
        ended_by TEXT,
        reason TEXT,
        codec TEXT,
        ladder BLOB NOT NULL DEFAULT '[]',
        updated_wall REAL NOT NULL
    )""",
    "CREATE INDEX calls_account ON calls (account, start_wall)",
    "CREATE INDEX calls_a_call_id ON calls (a_call_id)",
    "CREATE INDEX calls_b_call_id ON calls (b_call_id)",
    "CREATE INDEX calls_start ON calls (start_wall)",
    "CREATE INDEX calls_unfinished ON calls (call_ref) WHERE end_wall IS NULL",
    # The relay's final figures arrive after the record's last write, from
    # another code path; a table of their own makes their order irrelevant.
    """CREATE TABLE call_media (
        call_ref TEXT PRIMARY KEY,
        a_leg BLOB,
        b_leg BLOB,
        updated_wall REAL NOT NULL
    )""",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1_ACCOUNTS_AND_ROUTES, _V2_CALL_RECORDS)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The file was written by a newer kx-sipd; this one must not touch it."""


def schema_version(db: sqlite3.Connection) -> int:
    """The file's ``PRAGMA user_version``."""
    return int(db.execute("PRAGMA user_version").fetchall()[0][0])


def migrate(db: sqlite3.Connection, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the file to ``target`` (default: the latest) and return the version
    found before. Idempotent. ``db`` must be in autocommit mode
    (``isolation_level=None``). Raises SchemaTooNew, sqlite3.Error."""
    found = schema_version(db)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"database schema version {found} is newer than this kx-sipd supports "
            f"({SCHEMA_VERSION}); upgrade kx-sipd"
        )
    if found >= target:
        return found
    db.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(db)  # another process may have migrated meanwhile
        for statements in MIGRATIONS[found:target]:
            for statement in statements:
                db.execute(statement)
        if found < target:
            db.execute(f"PRAGMA user_version = {int(target)}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return found
