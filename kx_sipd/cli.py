"""The ``kx-sipd`` command: ``serve``, and the operator's ``accounts``,
``routes`` and ``calls`` commands over the store.

Every command takes ``--db PATH`` (env ``KX_DB``, default ``./kx.sqlite``).
Errors the operator can fix (unknown account, bad value, realm mismatch,
unreadable database) are printed as one ``Error:`` line with exit status 1;
usage errors exit with status 2 (click's convention). Passwords and HA1 are
never printed.

``serve`` builds a ``ServerSettings`` from its options, a TOML file
(``--config``: keys are the option names, dashes or underscores) and the
environment, in that order of precedence after the command line, and hands it
to ``kx_sipd.app.run_server``.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import click
import orjson

from sansio_sip import Address, CallRecordData, MediaStats, Route, StoreUnavailable, Transport

from . import __version__
from .relay_cli import relay
from .settings import (
    DEFAULT_DB,
    DEFAULT_DEMO_DB,
    DEMO_PASSWORD,
    DEMO_USERNAME,
    ServerSettings,
    field_doc,
    parse_address,
    parse_port_range,
)
from .store import ECHO_ROUTE, AccountInfo, CallEntry, NotFound, Store, StoreError

__all__ = ["main", "prepare_demo", "render_reference"]

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- shared helpers ----------------------------------------------------------


def _db_option(default: str | None = DEFAULT_DB) -> Callable[[F], F]:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False),
        default=default,
        envvar="KX_DB",
        show_envvar=True,
        help=f"The SQLite database [default: ./{DEFAULT_DB}].",
    )


def _operator_errors(function: F) -> F:
    """Turn store errors into one clear ``Error:`` line and exit status 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (StoreError, StoreUnavailable) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps loses the signature


def _open(db: str, *, create: bool = False, realm: str | None = None) -> Store:
    if not create and not os.path.exists(db):
        raise click.ClickException(
            f"no database at {os.path.abspath(db)}: create one with `kx-sipd accounts add` "
            "or `kx-sipd routes add`, or name another with --db / KX_DB"
        )
    return Store(db, realm=realm, create=create)


def _echo_json(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode())


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value) or "any"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _utc(wall: float | None) -> str | None:
    if wall is None:
        return None
    moment = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _read_password(password: str) -> str:
    """``-`` means: the first line of standard input (for scripts)."""
    if password == "-":
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.BadParameter("the password must not be empty", param_hint="--password")
    return password


_password_option = click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="The SIP password ('-' reads it from standard input; prompted when omitted). "
    "Only its HA1 is stored.",
)


class _TimeType(click.ParamType[float]):
    """A moment as ISO 8601 (UTC unless it says otherwise) or epoch seconds."""

    name = "TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is neither ISO 8601 (2024-05-01T13:00:00Z) nor epoch seconds")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()


class _AddressType(click.ParamType[Address]):
    """HOST:PORT, [IPv6]:PORT, or (with a default port) a bare host."""

    name = "HOST:PORT"

    def __init__(self, default_port: int | None = None) -> None:
        self.default_port = default_port
        if default_port is not None:
            self.name = "HOST[:PORT]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_address(str(value), default_port=self.default_port)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _PortRangeType(click.ParamType[tuple[int, int]]):
    name = "FIRST-LAST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_port_range(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


# -- the group ---------------------------------------------------------------


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="kx-sipd")
def main() -> None:
    """kx-sipd: a SIP edge server for digest-authenticated softphones and dialers.

    Start with `kx-sipd serve --demo`; manage accounts, routes and call records
    with the commands below (each takes --db PATH, env KX_DB).
    """


# -- accounts ----------------------------------------------------------------


@main.group(context_settings=CONTEXT)
def accounts() -> None:
    """Create, change, suspend and list SIP accounts (digest credentials)."""


def _account_json(info: AccountInfo) -> dict[str, Any]:
    return attrs.asdict(info)


def _show_account(info: AccountInfo) -> None:
    rows = [
        ("username", info.username),
        ("status", info.status),
        ("route", info.route),
        ("allowed destinations", info.allowed_prefixes),
        ("max concurrent calls", info.max_calls or "unlimited"),
        ("max calls per second", info.max_cps or "unlimited"),
        ("caller ID", info.caller_id),
        ("allowed sources", info.allowed_sources),
        ("created", _utc(info.created)),
        ("updated", _utc(info.updated)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {_cell(value)}")


@accounts.command("add")
@click.argument("username")
@_password_option
@click.option("--route", help="Route (carrier) the account's calls go to; must exist.")
@click.option(
    "--allow",
    "allowed_prefixes",
    multiple=True,
    metavar="PREFIX",
    help="Allowed destination prefix (digits); repeat for several. None: any destination.",
)
@click.option("--max-calls", type=click.IntRange(min=1), help="Concurrent calls allowed.")
@click.option(
    "--max-cps", type=click.FloatRange(min=0, min_open=True), help="New calls per second allowed."
)
@click.option("--caller-id", metavar="NUMBER", help="Caller ID presented to the carrier.")
@click.option(
    "--source",
    "allowed_sources",
    multiple=True,
    metavar="CIDR",
    help="Source address or network the account may connect from; repeat. None: anywhere.",
)
@click.option(
    "--realm",
    help="Realm of a NEW database (default sip.kx21.com). An existing database keeps its "
    "realm; a different one is refused.",
)
@_db_option()
@_operator_errors
def accounts_add(
    username: str,
    password: str,
    route: str | None,
    allowed_prefixes: tuple[str, ...],
    max_calls: int | None,
    max_cps: float | None,
    caller_id: str | None,
    allowed_sources: tuple[str, ...],
    realm: str | None,
    db: str,
) -> None:
    """Create the account USERNAME (creating the database if needed)."""
    with _open(db, create=True, realm=realm) as store:
        store.add_account(
            username,
            _read_password(password),
            route=route,
            allowed_prefixes=allowed_prefixes,
            max_calls=max_calls,
            max_cps=max_cps,
            caller_id=caller_id,
            allowed_sources=allowed_sources,
        )
        click.echo(f"account {username} added (realm {store.realm})")


@accounts.command("set")
@click.argument("username")
@click.option("--route", help="New route (must exist).")
@click.option("--no-route", is_flag=True, help="Remove the account's route.")
@click.option(
    "--allow",
    "allowed_prefixes",
    multiple=True,
    metavar="PREFIX",
    help="Replace the allowed destination prefixes; repeat for several.",
)
@click.option("--allow-any", is_flag=True, help="Allow every destination.")
@click.option("--max-calls", type=click.IntRange(min=0), help="Concurrent calls (0: no limit).")
@click.option("--max-cps", type=click.FloatRange(min=0), help="New calls per second (0: no limit).")
@click.option("--caller-id", metavar="NUMBER", help="Caller ID ('' removes it).")
@click.option(
    "--source",
    "allowed_sources",
    multiple=True,
    metavar="CIDR",
    help="Replace the allowed source networks; repeat for several.",
)
@click.option("--any-source", is_flag=True, help="Allow every source address.")
@_db_option()
@_operator_errors
def accounts_set(
    username: str,
    route: str | None,
    no_route: bool,
    allowed_prefixes: tuple[str, ...],
    allow_any: bool,
    max_calls: int | None,
    max_cps: float | None,
    caller_id: str | None,
    allowed_sources: tuple[str, ...],
    any_source: bool,
    db: str,
) -> None:
    """Change some settings of the account USERNAME (others stay)."""
    changes: dict[str, Any] = {}
    if route is not None and no_route:
        raise click.UsageError("--route and --no-route contradict each other")
    if allowed_prefixes and allow_any:
        raise click.UsageError("--allow and --allow-any contradict each other")
    if allowed_sources and any_source:
        raise click.UsageError("--source and --any-source contradict each other")
    if route is not None or no_route:
        changes["route"] = route
    if allowed_prefixes or allow_any:
        changes["allowed_prefixes"] = allowed_prefixes
    if allowed_sources or any_source:
        changes["allowed_sources"] = allowed_sources
    if max_calls is not None:
        changes["max_calls"] = max_calls or None
    if max_cps is not None:
        changes["max_cps"] = max_cps or None
    if caller_id is not None:
        changes["caller_id"] = caller_id or None
    if not changes:
        raise click.UsageError("nothing to change: give at least one option")
    with _open(db) as store:
        _show_account(store.update_account(username, **changes))


@accounts.command("passwd")
@click.argument("username")
@_password_option
@_db_option()
@_operator_errors
def accounts_passwd(username: str, password: str, db: str) -> None:
    """Set a new password for USERNAME; the very next request checks it."""
    with _open(db) as store:
        store.set_password(username, _read_password(password))
    click.echo(f"password of {username} changed")


@accounts.command("suspend")
@click.argument("username")
@_db_option()
@_operator_errors
def accounts_suspend(username: str, db: str) -> None:
    """Suspend USERNAME: its requests get 403 Unknown user until resumed."""
    with _open(db) as store:
        store.set_active(username, False)
    click.echo(f"account {username} suspended")


@accounts.command("resume")
@click.argument("username")
@_db_option()
@_operator_errors
def accounts_resume(username: str, db: str) -> None:
    """Resume a suspended USERNAME."""
    with _open(db) as store:
        store.set_active(username, True)
    click.echo(f"account {username} active")


@accounts.command("delete")
@click.argument("username")
@_db_option()
@_operator_errors
def accounts_delete(username: str, db: str) -> None:
    """Delete USERNAME (its call records are kept)."""
    with _open(db) as store:
        store.delete_account(username)
    click.echo(f"account {username} deleted")


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_db_option()
@_operator_errors
def accounts_list(as_json: bool, db: str) -> None:
    """List the accounts (never their credentials)."""
    with _open(db) as store:
        infos = store.list_accounts()
    if as_json:
        for info in infos:
            _echo_json(_account_json(info))
        return
    click.echo(
        _table(
            (
                "USERNAME",
                "STATUS",
                "ROUTE",
                "ALLOW",
                "MAX-CALLS",
                "MAX-CPS",
                "CALLER-ID",
                "SOURCES",
            ),
            (
                (
                    info.username,
                    info.status,
                    info.route,
                    info.allowed_prefixes,
                    info.max_calls,
                    info.max_cps,
                    info.caller_id,
                    info.allowed_sources,
                )
                for info in infos
            ),
        )
    )


@accounts.command("show")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
@_db_option()
@_operator_errors
def accounts_show(username: str, as_json: bool, db: str) -> None:
    """Show one account (never its credentials)."""
    with _open(db) as store:
        info = store.account_info(username)
    if info is None:
        raise NotFound(f"no account {username!r}")
    if as_json:
        _echo_json(_account_json(info))
    else:
        _show_account(info)


# -- routes ------------------------------------------------------------------


@main.group(context_settings=CONTEXT)
def routes() -> None:
    """Carrier routes (IP trunks) that accounts' calls are handed to.

    The route `echo` is built in: calls on it are answered by kx-sipd itself.
    """


def _route_json(route: Route) -> dict[str, Any]:
    return {
        "name": route.name,
        "host": route.host,
        "port": route.port,
        "transport": route.transport.value.lower(),
        "strip": route.strip,
        "prefix": route.prefix,
    }


def _route_options(required_host: bool) -> Callable[[F], F]:
    def decorate(function: F) -> F:
        options = [
            click.option("--host", required=required_host, help="Carrier host name or IP address."),
            click.option(
                "--port",
                type=click.IntRange(1, 65535),
                default=5060 if required_host else None,
                show_default=required_host,
            ),
            click.option(
                "--transport",
                type=click.Choice(["udp", "tcp"], case_sensitive=False),
                default="udp" if required_host else None,
                show_default=required_host,
            ),
            click.option(
                "--strip",
                type=click.IntRange(min=0),
                default=0 if required_host else None,
                show_default=required_host,
                help="Leading digits removed from the dialed number.",
            ),
            click.option(
                "--prefix",
                metavar="DIGITS",
                default="" if required_host else None,
                help="Digits put in front of the number (after --strip).",
            ),
        ]
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


@routes.command("add")
@click.argument("name")
@_route_options(required_host=True)
@_db_option()
@_operator_errors
def routes_add(
    name: str, host: str, port: int, transport: str, strip: int, prefix: str, db: str
) -> None:
    """Create the route NAME (creating the database if needed)."""
    route = Route(
        name=name,
        host=host,
        port=port,
        transport=Transport(transport.upper()),
        strip=strip,
        prefix=prefix,
    )
    with _open(db, create=True) as store:
        store.put_route(route)
    click.echo(f"route {name} added")


@routes.command("set")
@click.argument("name")
@_route_options(required_host=False)
@_db_option()
@_operator_errors
def routes_set(
    name: str,
    host: str | None,
    port: int | None,
    transport: str | None,
    strip: int | None,
    prefix: str | None,
    db: str,
) -> None:
    """Change the route NAME (given options only), or create it when --host is given."""
    with _open(db, create=host is not None) as store:
        old = store.get_route(name)
        if old is None and host is None:
            raise NotFound(f"no route {name!r} (give --host to create it)")
        base = old or Route(name=name, host=host or "")
        route = attrs.evolve(
            base,
            host=host if host is not None else base.host,
            port=port if port is not None else base.port,
            transport=Transport(transport.upper()) if transport else base.transport,
            strip=strip if strip is not None else base.strip,
            prefix=prefix if prefix is not None else base.prefix,
        )
        store.put_route(route, replace=True)
    click.echo(f"route {name} {'changed' if old else 'added'}")


@routes.command("delete")
@click.argument("name")
@_db_option()
@_operator_errors
def routes_delete(name: str, db: str) -> None:
    """Delete the route NAME (refused while an account uses it)."""
    with _open(db) as store:
        store.delete_route(name)
    click.echo(f"route {name} deleted")


@routes.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_db_option()
@_operator_errors
def routes_list(as_json: bool, db: str) -> None:
    """List the routes."""
    with _open(db) as store:
        found = store.list_routes()
    if as_json:
        for route in found:
            _echo_json(_route_json(route))
        return
    click.echo(
        _table(
            ("NAME", "HOST", "PORT", "TRANSPORT", "STRIP", "PREFIX"),
            (
                (
                    route.name,
                    "(kx-sipd echo test)" if route.name == ECHO_ROUTE else route.host,
                    route.port,
                    route.transport.value.lower(),
                    route.strip,
                    route.prefix or None,
                )
                for route in found
            ),
        )
    )


# -- calls -------------------------------------------------------------------

_CSV_MEDIA = tuple(field.name for field in attrs.fields(MediaStats))
_CSV_COLUMNS = (
    *(field.name for field in attrs.fields(CallRecordData) if field.name != "ladder"),
    "duration",
    "billable",
    *(f"a_{name}" for name in _CSV_MEDIA),
    *(f"b_{name}" for name in _CSV_MEDIA),
)


@main.group(context_settings=CONTEXT)
def calls() -> None:
    """Call records: list, filter, export (JSON lines or CSV), and show one with its SIP ladder."""


def _call_json(entry: CallEntry, *, ladder: bool) -> dict[str, Any]:
    record = entry.record
    data = attrs.asdict(record)
    if not ladder:
        del data["ladder"]
    data["start"] = _utc(record.start_wall)
    data["answer"] = _utc(record.answer_wall)
    data["end"] = _utc(record.end_wall)
    data["duration"] = record.duration
    data["billable"] = record.billable
    data["a_media"] = attrs.asdict(entry.a_media) if entry.a_media else None
    data["b_media"] = attrs.asdict(entry.b_media) if entry.b_media else None
    return data


def _call_csv_row(entry: CallEntry) -> list[object]:
    record = entry.record
    row: list[object] = [getattr(record, name) for name in _CSV_COLUMNS[: -2 - 2 * len(_CSV_MEDIA)]]
    row.append("" if record.duration is None else f"{record.duration:.3f}")
    row.append(record.billable)
    for stats in (entry.a_media, entry.b_media):
        row.extend(getattr(stats, name) if stats else "" for name in _CSV_MEDIA)
    return ["" if value is None else value for value in row]


@calls.command("list")
@click.option("--account", help="Only this account's calls.")
@click.option(
    "--since", type=_TimeType(), help="Calls started at or after TIME (ISO 8601 / epoch)."
)
@click.option("--until", type=_TimeType(), help="Calls started before TIME.")
@click.option("--call-id", help="Only the call with this Call-ID (client or carrier leg).")
@click.option(
    "--limit", type=click.IntRange(min=0), default=100, show_default=True, help="0: no limit."
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines (one record per line).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@_db_option()
@_operator_errors
def calls_list(
    account: str | None,
    since: float | None,
    until: float | None,
    call_id: str | None,
    limit: int,
    as_json: bool,
    as_csv: bool,
    db: str,
) -> None:
    """List call records, newest first."""
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    with _open(db) as store:
        entries = store.list_calls(
            account=account, since=since, until=until, call_id=call_id, limit=limit or None
        )
    if as_json:
        for entry in entries:
            _echo_json(_call_json(entry, ladder=False))
    elif as_csv:
        out = click.get_text_stream("stdout")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        writer.writerows(_call_csv_row(entry) for entry in entries)
    else:
        click.echo(
            _table(
                (
                    "START (UTC)",
                    "ACCOUNT",
                    "DIALED",
                    "STATUS",
                    "SECONDS",
                    "BILLED",
                    "ENDED-BY",
                    "CALL-ID",
                ),
                (
                    (
                        _utc(entry.record.start_wall),
                        entry.record.account,
                        entry.record.dialed,
                        entry.record.final_status,
                        None if entry.record.duration is None else round(entry.record.duration, 1),
                        entry.record.billable,
                        entry.record.ended_by or "(up)",
                        entry.record.a_call_id,
                    )
                    for entry in entries
                ),
            )
        )


def _show_call(entry: CallEntry, *, messages: bool) -> None:
    record = entry.record
    facts = [
        ("call", record.call_ref),
        ("account", record.account),
        ("Call-ID (client)", record.a_call_id),
        ("Call-ID (carrier)", record.b_call_id),
        ("source", f"{record.source} {record.transport}"),
        ("user agent", record.user_agent),
        ("dialed", record.dialed),
        ("sent digits", record.sent_digits),
        ("route", record.route),
        ("start", _utc(record.start_wall)),
        ("answer", _utc(record.answer_wall)),
        ("end", _utc(record.end_wall)),
        ("duration", None if record.duration is None else f"{record.duration:.3f} s"),
        ("billable", f"{record.billable} s"),
        ("final status", record.final_status),
        ("ended by", record.ended_by),
        ("reason", record.reason),
        ("codec", record.codec),
        ("media A (client)", _media_text(entry.a_media)),
        ("media B (carrier)", _media_text(entry.b_media)),
    ]
    width = max(len(name) for name, _ in facts)
    for name, value in facts:
        click.echo(f"{name.ljust(width)}  {_cell(value)}")
    click.echo(f"\nSIP ladder ({len(record.ladder)} messages):")
    for item in record.ladder:
        arrow = "<-" if item.direction == "in" else "->"
        lines = item.message.replace("\r\n", "\n").rstrip("\n").split("\n")
        click.echo(
            f"  {_utc(item.wall)}  leg {item.leg}  {arrow} {item.peer} {item.transport}  {lines[0]}"
        )
        if messages:
            for line in lines[1:]:
                click.echo(f"      {line}")


def _media_text(stats: MediaStats | None) -> str | None:
    if stats is None:
        return None
    return (
        f"in {stats.packets_in} pkts/{stats.bytes_in} B, out {stats.packets_out} pkts/"
        f"{stats.bytes_out} B, lost {stats.packets_lost}, jitter {stats.jitter_ms:g} ms"
    )


@calls.command("show")
@click.argument("call_id", metavar="CALL-ID")
@click.option("--json", "as_json", is_flag=True, help="As JSON (one object per matching call).")
@click.option("--summary", is_flag=True, help="Only the first line of each SIP message.")
@_db_option()
@_operator_errors
def calls_show(call_id: str, as_json: bool, summary: bool, db: str) -> None:
    """Show the call with CALL-ID (client or carrier leg, or the call reference)
    and its SIP ladder: every message in and out, with UTC time, leg and peer."""
    with _open(db) as store:
        entries = store.list_calls(call_id=call_id, limit=None)
    if not entries:
        raise NotFound(f"no call with Call-ID {call_id!r}")
    for index, entry in enumerate(entries):
        if as_json:
            _echo_json(_call_json(entry, ladder=True))
            continue
        if index:
            click.echo("")
        _show_call(entry, messages=not summary)


# -- serve -------------------------------------------------------------------


def _load_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """Read the TOML file into click's default_map: below the command line and
    the environment, above the built-in defaults."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}") from None
    known = {param.name for param in ctx.command.params if param.name and param.name != "config"}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise click.BadParameter(f"{path}: unknown setting {key!r}")
        if name == "listen" and isinstance(value, str):
            value = [value]
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def _serve_option(name: str, **kwargs: Any) -> Callable[[F], F]:
    """An option of serve whose help is the ServerSettings field's doc."""
    flag = "--" + name.replace("_", "-")
    return click.option(flag, name, help=field_doc(name), **kwargs)


@main.command(context_settings=CONTEXT)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="TOML file of serve settings (keys as the options below, dashes or underscores); "
    "the command line and the environment win over it.",
)
@_serve_option("listen", type=_AddressType(default_port=5060), multiple=True, metavar="HOST[:PORT]")
@_serve_option("db", type=click.Path(dir_okay=False), envvar="KX_DB", show_envvar=True)
@_serve_option("realm")
@_serve_option("demo", is_flag=True)
@_serve_option(
    "backend", type=click.Choice(["asyncio", "trio"]), default="asyncio", show_default=True
)
@_serve_option("driver", type=click.Choice(["anyio", "socket"]), default="anyio", show_default=True)
@_serve_option(
    "log_level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@_serve_option("sip_address", type=_AddressType(default_port=0), metavar="HOST[:PORT]")
@_serve_option("relay", type=_AddressType(), metavar="HOST:PORT")
@_serve_option("relay_shards", type=click.IntRange(min=1), metavar="N")
@_serve_option("rtp_range", type=_PortRangeType(), default="20000-20999", show_default=True)
@_serve_option("rtp_address", metavar="IP")
@_serve_option("relay_secret", envvar="KX_RELAY_SECRET", show_envvar=True)
@_serve_option(
    "media_timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="S",
)
@_serve_option("echo_number", default="9196", show_default=True, metavar="DIGITS")
@_serve_option(
    "max_calls", type=click.IntRange(min=1), default=5000, show_default=True, metavar="N"
)
@_serve_option("uniform_auth_failures", is_flag=True)
@_serve_option("metrics", type=_AddressType(), metavar="HOST:PORT")
@_serve_option(
    "store_timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    metavar="S",
)
@_serve_option(
    "shutdown_grace",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="S",
)
@_serve_option(
    "max_tcp_connections", type=click.IntRange(min=1), default=4096, show_default=True, metavar="N"
)
@_serve_option(
    "max_tcp_per_ip", type=click.IntRange(min=1), default=64, show_default=True, metavar="N"
)
@_serve_option(
    "tcp_idle_timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="S",
)
@click.pass_context
@_operator_errors
def serve(ctx: click.Context, /, **options: Any) -> None:
    """Run the SIP server (UDP and TCP on each --listen address) with its RTP relay.

    Every option can also come from --config FILE. With --demo, a ready-to-use
    database and account are made and the softphone settings are printed.
    """
    settings = build_settings(ctx, options)
    try:
        from .app import run_server
    except ImportError as exc:
        raise click.ClickException(
            f"the server wiring is missing from this install: {exc}"
        ) from None
    if settings.demo:
        # The database is ready before the server opens it; the server prints
        # the softphone settings (kx_sipd.app.demo_banner) once it listens.
        prepare_demo(settings.db, settings.realm)
    run_server(settings)


def build_settings(ctx: click.Context, options: dict[str, Any]) -> ServerSettings:
    """ServerSettings from serve's parsed options (defaults resolved for --demo)."""
    demo = bool(options["demo"])
    values = dict(options)
    if not _given(ctx, "db"):
        values["db"] = DEFAULT_DEMO_DB if demo else DEFAULT_DB
    if not values["listen"]:
        values["listen"] = (("127.0.0.1", 5060),) if demo else (("0.0.0.0", 5060),)
    listen = tuple(values["listen"])
    sip_address = values["sip_address"]
    if sip_address is not None and sip_address[1] == 0:
        values["sip_address"] = (sip_address[0], listen[0][1])
    try:
        return ServerSettings(**values)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None


def prepare_demo(db: str, realm: str | None) -> str:
    """Create or reuse the demo database: the ``demo`` account with the
    documented password, routed to the echo test. Returns the database's realm.
    Raises StoreError, StoreUnavailable."""
    with Store(db, realm=realm) as store:
        if store.account_info(DEMO_USERNAME) is None:
            store.add_account(DEMO_USERNAME, DEMO_PASSWORD, route=ECHO_ROUTE)
        else:
            store.set_password(DEMO_USERNAME, DEMO_PASSWORD)
            store.update_account(DEMO_USERNAME, route=ECHO_ROUTE)
            store.set_active(DEMO_USERNAME, True)
        return store.realm


# -- the RTP relay (kx_sipd/relay_cli.py) -------------------------------------

main.add_command(relay)


# -- reference documentation -------------------------------------------------


def render_reference() -> str:
    """docs/operator-cli.md: every command's help, and the serve settings."""
    lines = [
        "# kx-sipd command reference",
        "",
        "Generated from the click commands and `kx_sipd.settings.ServerSettings` by",
        "`tests/unit/test_cli_docs.py` (run it with `KX_REGEN_DOCS=1` to rewrite this file).",
        "",
        "## The database",
        "",
        "One SQLite file (`--db`, env `KX_DB`, default `./kx.sqlite`) holds the accounts, the",
        "routes and the call records. It is made for one digest realm (the stored HA1s depend",
        "on it) and holds the nonce secret, so every kx-sipd process using the file signs",
        "nonces alike. Changes made with these commands while the server runs are seen by",
        "its very next request. A call record is on disk (fsynced) before the server",
        "acknowledges the request that ended the call, so it survives a killed process and",
        "a power cut. Operator errors print one `Error:` line and exit with status 1; usage",
        "errors exit with status 2.",
        "",
    ]

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        # A fixed width, so the file does not depend on the terminal it was made in.
        ctx = click.Context(
            command,
            info_name=path[-1],
            parent=parent,
            terminal_width=100,
            max_content_width=100,
            help_option_names=["-h", "--help"],
        )
        lines.extend([f"## `{' '.join(path)}`", "", "```", command.get_help(ctx), "```", ""])
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(main, ["kx-sipd"], None)
    lines.extend(
        [
            "## Server settings (`serve` options and `--config` TOML keys)",
            "",
            "| setting | default | meaning |",
            "|---|---|---|",
        ]
    )
    for field in attrs.fields(ServerSettings):
        default = field.default
        shown = "—" if default is None else f"`{default}`"
        if field.name == "listen":
            shown = "`0.0.0.0:5060`"
        elif field.name == "rtp_range":
            shown = "`20000-20999`"
        doc = str(field.metadata["doc"]).replace("|", "\\|")
        lines.append(f"| `{field.name.replace('_', '-')}` | {shown} | {doc} |")
    lines.append("")
    return "\n".join(lines)
