"""What the store knows about its rows: the operator's input checks, the SQL
it runs, and the conversions between rows and the model objects
(``sansio_sip.Account``, ``Route``, ``CallRecordData``, ``MediaStats``).

No connection handling here (that is ``store.py``); these functions take a
connection or a row and do one thing.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Final

import attrs
import orjson

from sansio_sip import (
    Account,
    CallRecordData,
    LadderEntry,
    MediaStats,
    Route,
    Transport,
)

__all__ = [
    "ACCOUNT_FIELDS",
    "ACCOUNT_QUERY",
    "CALL_QUERY",
    "ECHO_ROUTE",
    "INFO_QUERY",
    "REALM",
    "RECORD_COLUMNS",
    "ROUTE_QUERY",
    "UPSERT_CALL",
    "UPSERT_MEDIA",
    "AccountInfo",
    "CallEntry",
    "Conflict",
    "NotFound",
    "RealmMismatch",
    "StoreError",
    "account_fields",
    "account_from_row",
    "call_from_row",
    "check_route",
    "check_route_exists",
    "check_username",
    "info_from_row",
    "ladder_from_json",
    "record_values",
    "route_from_row",
    "row_exists",
    "stats_from_json",
    "stats_json",
]

ECHO_ROUTE: Final = "echo"
"""The built-in route answered by kx-sipd itself (the echo test)."""

_USERNAME = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/]{1,64}")
"""RFC 3261 §25.1 ``user`` characters (unreserved and user-unreserved), no escapes."""
_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGITS = re.compile(r"[0-9]{1,32}")
_DIAL_PREFIX = re.compile(r"[0-9+*#]{0,32}")
_CALLER_ID = re.compile(r"\+?[0-9]{1,32}")
REALM = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
"""Printable ASCII without '"' and '\\': it is sent as a quoted-string."""


class StoreError(Exception):
    """An operator's request the store refuses (bad value, missing or
    conflicting row). The message is meant for the operator as it is."""


class RealmMismatch(StoreError):
    """The database was made for another realm than the one asked for."""


class NotFound(StoreError):
    """No such account, route or call."""


class Conflict(StoreError):
    """The change would clash with existing data (duplicate, route in use...)."""


@attrs.frozen(kw_only=True)
class AccountInfo:
    """An account as the operator sees it (never its HA1)."""

    username: str
    status: str
    route: str | None
    allowed_prefixes: tuple[str, ...]
    max_calls: int | None
    max_cps: float | None
    caller_id: str | None
    allowed_sources: tuple[str, ...]
    created: float
    updated: float


@attrs.frozen(kw_only=True)
class CallEntry:
    """A stored call record with the relay's per-leg figures, when they came."""

    record: CallRecordData
    a_media: MediaStats | None = None
    b_media: MediaStats | None = None


# -- SQL and row conversion ----------------------------------------------------

ACCOUNT_FIELDS = (
    "route",
    "allowed_prefixes",
    "max_calls",
    "max_cps",
    "caller_id",
    "allowed_sources",
)

ACCOUNT_QUERY = (
    "SELECT a.username, a.ha1_md5, a.ha1_sha256, a.status, a.allowed_prefixes, "
    "a.max_calls, a.max_cps, a.caller_id, a.allowed_sources, "
    "r.name, r.host, r.port, r.transport, r.strip, r.prefix "
    "FROM accounts a LEFT JOIN routes r ON r.name = a.route WHERE a.username = ?"
)
INFO_QUERY = (
    "SELECT username, status, route, allowed_prefixes, max_calls, max_cps, caller_id, "
    "allowed_sources, created, updated FROM accounts"
)
ROUTE_QUERY = "SELECT name, host, port, transport, strip, prefix FROM routes"
RECORD_COLUMNS = (
    "call_ref",
    "account",
    "a_call_id",
    "b_call_id",
    "source",
    "transport",
    "user_agent",
    "dialed",
    "sent_digits",
    "route",
    "start_wall",
    "answer_wall",
    "end_wall",
    "final_status",
    "ended_by",
    "reason",
    "codec",
)
UPSERT_CALL = (
    f"INSERT INTO calls ({', '.join(RECORD_COLUMNS)}, ladder, updated_wall) "
    f"VALUES ({', '.join('?' * (len(RECORD_COLUMNS) + 2))}) "
    "ON CONFLICT (call_ref) DO UPDATE SET "
    + ", ".join(
        f"{name} = excluded.{name}" for name in (*RECORD_COLUMNS[1:], "ladder", "updated_wall")
    )
)
UPSERT_MEDIA = (
    "INSERT INTO call_media (call_ref, a_leg, b_leg, updated_wall) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (call_ref) DO UPDATE SET a_leg = excluded.a_leg, b_leg = excluded.b_leg, "
    "updated_wall = excluded.updated_wall"
)
CALL_QUERY = (
    f"SELECT {', '.join('c.' + name for name in RECORD_COLUMNS)}, c.ladder, m.a_leg, m.b_leg "
    "FROM calls c LEFT JOIN call_media m ON m.call_ref = c.call_ref"
)


def row_exists(db: sqlite3.Connection, table: str, column: str, value: str) -> bool:
    return bool(db.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (value,)).fetchall())


def check_route_exists(db: sqlite3.Connection, route: str | None) -> None:
    if route is not None and not row_exists(db, "routes", "name", route):
        raise NotFound(f"no route {route!r} (create it first with `kx-sipd routes add`)")


def check_username(username: str) -> None:
    if not _USERNAME.fullmatch(username):
        raise StoreError(
            f"invalid username {username!r}: 1-64 letters, digits or -_.!~*'()&=+$,;?/"
        )


def check_route(route: Route) -> None:
    if not _ROUTE_NAME.fullmatch(route.name):
        raise StoreError(f"invalid route name {route.name!r}: letters, digits, '.', '_', '-'")
    if route.name == ECHO_ROUTE:
        raise StoreError("the echo route is built in and cannot be changed")
    if not route.host or any(c.isspace() for c in route.host) or len(route.host) > 255:
        raise StoreError(f"invalid host {route.host!r}")
    if not 0 < route.port < 65536:
        raise StoreError(f"invalid port {route.port}: 1-65535")
    if route.strip < 0:
        raise StoreError("strip must be 0 or more digits")
    if not _DIAL_PREFIX.fullmatch(route.prefix):
        raise StoreError(f"invalid prefix {route.prefix!r}: digits, '+', '*', '#'")


def account_fields(**given: Any) -> dict[str, Any]:
    """Validate account fields and convert them to column values (only those given)."""
    fields: dict[str, Any] = {}
    if "route" in given:
        fields["route"] = given["route"]
    if "allowed_prefixes" in given:
        prefixes = tuple(given["allowed_prefixes"])
        for prefix in prefixes:
            if not _DIGITS.fullmatch(prefix):
                raise StoreError(f"invalid destination prefix {prefix!r}: digits only")
        fields["allowed_prefixes"] = orjson.dumps(sorted(set(prefixes))).decode()
    if "max_calls" in given:
        max_calls = given["max_calls"]
        if max_calls is not None and (not isinstance(max_calls, int) or max_calls <= 0):
            raise StoreError(f"max calls must be a positive whole number, not {max_calls!r}")
        fields["max_calls"] = max_calls
    if "max_cps" in given:
        max_cps = given["max_cps"]
        if max_cps is not None and not (isinstance(max_cps, int | float) and max_cps > 0):
            raise StoreError(f"max calls per second must be positive, not {max_cps!r}")
        fields["max_cps"] = None if max_cps is None else float(max_cps)
    if "caller_id" in given:
        caller_id = given["caller_id"]
        if caller_id is not None and not _CALLER_ID.fullmatch(caller_id):
            raise StoreError(f"invalid caller ID {caller_id!r}: digits, optionally after '+'")
        fields["caller_id"] = caller_id
    if "allowed_sources" in given:
        sources: list[str] = []
        for text in given["allowed_sources"]:
            try:
                sources.append(str(ipaddress.ip_network(text, strict=False)))
            except ValueError:
                raise StoreError(
                    f"invalid source {text!r}: expected an IP address or CIDR"
                ) from None
        fields["allowed_sources"] = orjson.dumps(sorted(set(sources))).decode()
    return fields


def account_from_row(row: tuple[Any, ...]) -> Account:
    (username, md5, sha256, status, prefixes, max_calls, max_cps, caller_id, sources) = row[:9]
    route = route_from_row(row[9:]) if row[9] is not None else None
    return Account(
        username=username,
        ha1={"MD5": md5, "SHA-256": sha256},
        active=status == "active",
        route=route,
        allowed_prefixes=tuple(orjson.loads(prefixes)),
        max_calls=max_calls,
        max_cps=max_cps,
        caller_id=caller_id,
        allowed_sources=tuple(orjson.loads(sources)),
    )


def info_from_row(row: tuple[Any, ...]) -> AccountInfo:
    username, status, route, prefixes, max_calls, max_cps, caller_id, sources, created, updated = (
        row
    )
    return AccountInfo(
        username=username,
        status=status,
        route=route,
        allowed_prefixes=tuple(orjson.loads(prefixes)),
        max_calls=max_calls,
        max_cps=max_cps,
        caller_id=caller_id,
        allowed_sources=tuple(orjson.loads(sources)),
        created=created,
        updated=updated,
    )


def route_from_row(row: Sequence[Any]) -> Route:
    name, host, port, transport, strip, prefix = row
    return Route(
        name=name,
        host=host,
        port=port,
        transport=Transport(transport.upper()),
        strip=strip,
        prefix=prefix,
    )


def record_values(record: CallRecordData) -> tuple[Any, ...]:
    ladder = orjson.dumps([_ladder_dict(entry) for entry in record.ladder])
    return (
        *(getattr(record, name) for name in RECORD_COLUMNS),
        ladder,
        time.time(),
    )


def _ladder_dict(entry: LadderEntry) -> dict[str, Any]:
    """``attrs.asdict(entry)``, written out: a third of its cost, on the writer thread
    that shares the interpreter with the event loop (tests/unit/test_store.py holds
    the two equal)."""
    return {
        "wall": entry.wall,
        "direction": entry.direction,
        "leg": entry.leg,
        "peer": entry.peer,
        "transport": entry.transport,
        "message": entry.message,
    }


def ladder_from_json(data: bytes | str) -> tuple[LadderEntry, ...]:
    try:
        return tuple(LadderEntry(**entry) for entry in orjson.loads(data))
    except (orjson.JSONDecodeError, TypeError):
        # A damaged ladder must not hide the rest of the record.
        return ()


def stats_json(stats: MediaStats | None) -> bytes | None:
    return None if stats is None else orjson.dumps(attrs.asdict(stats))


def stats_from_json(data: bytes | str | None) -> MediaStats | None:
    if data is None:
        return None
    try:
        return MediaStats(**orjson.loads(data))
    except (orjson.JSONDecodeError, TypeError):
        return None


def call_from_row(row: tuple[Any, ...]) -> CallEntry:
    count = len(RECORD_COLUMNS)
    fields = dict(zip(RECORD_COLUMNS, row[:count], strict=True))
    ladder_json, a_leg, b_leg = row[count:]
    return CallEntry(
        record=CallRecordData(**fields, ladder=ladder_from_json(ladder_json)),
        a_media=stats_from_json(a_leg),
        b_media=stats_from_json(b_leg),
    )
