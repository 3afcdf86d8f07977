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

from collections.abc import Callable
from typing import Any

import attrs
import click

from sansio_sip import Route, Transport

from . import __version__
from ._cli_calls import calls
from ._cli_common import (
    CONTEXT,
    F,
    cell,
    db_option,
    echo_json,
    open_store,
    operator_errors,
    password_option,
    read_password,
    table,
    utc,
)
from ._cli_ops import bans, calls_pcap, status
from ._cli_serve import prepare_demo, serve
from .relay_cli import relay
from .settings import (
    ServerSettings,
)
from .store import ECHO_ROUTE, AccountInfo, NotFound

__all__ = ["main", "prepare_demo", "render_reference"]

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
        ("created", utc(info.created)),
        ("updated", utc(info.updated)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {cell(value)}")


@accounts.command("add")
@click.argument("username")
@password_option
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
@db_option()
@operator_errors
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
    with open_store(db, create=True, realm=realm) as store:
        store.add_account(
            username,
            read_password(password),
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
@db_option()
@operator_errors
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
    with open_store(db) as store:
        _show_account(store.update_account(username, **changes))


@accounts.command("passwd")
@click.argument("username")
@password_option
@db_option()
@operator_errors
def accounts_passwd(username: str, password: str, db: str) -> None:
    """Set a new password for USERNAME; the very next request checks it."""
    with open_store(db) as store:
        store.set_password(username, read_password(password))
    click.echo(f"password of {username} changed")


@accounts.command("suspend")
@click.argument("username")
@db_option()
@operator_errors
def accounts_suspend(username: str, db: str) -> None:
    """Suspend USERNAME: its requests get 403 Unknown user until resumed."""
    with open_store(db) as store:
        store.set_active(username, False)
    click.echo(f"account {username} suspended")


@accounts.command("resume")
@click.argument("username")
@db_option()
@operator_errors
def accounts_resume(username: str, db: str) -> None:
    """Resume a suspended USERNAME."""
    with open_store(db) as store:
        store.set_active(username, True)
    click.echo(f"account {username} active")


@accounts.command("delete")
@click.argument("username")
@db_option()
@operator_errors
def accounts_delete(username: str, db: str) -> None:
    """Delete USERNAME (its call records are kept)."""
    with open_store(db) as store:
        store.delete_account(username)
    click.echo(f"account {username} deleted")


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@db_option()
@operator_errors
def accounts_list(as_json: bool, db: str) -> None:
    """List the accounts (never their credentials)."""
    with open_store(db) as store:
        infos = store.list_accounts()
    if as_json:
        for info in infos:
            echo_json(_account_json(info))
        return
    click.echo(
        table(
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
@db_option()
@operator_errors
def accounts_show(username: str, as_json: bool, db: str) -> None:
    """Show one account (never its credentials)."""
    with open_store(db) as store:
        info = store.account_info(username)
    if info is None:
        raise NotFound(f"no account {username!r}")
    if as_json:
        echo_json(_account_json(info))
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
@db_option()
@operator_errors
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
    with open_store(db, create=True) as store:
        store.put_route(route)
    click.echo(f"route {name} added")


@routes.command("set")
@click.argument("name")
@_route_options(required_host=False)
@db_option()
@operator_errors
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
    with open_store(db, create=host is not None) as store:
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
@db_option()
@operator_errors
def routes_delete(name: str, db: str) -> None:
    """Delete the route NAME (refused while an account uses it)."""
    with open_store(db) as store:
        store.delete_route(name)
    click.echo(f"route {name} deleted")


@routes.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@db_option()
@operator_errors
def routes_list(as_json: bool, db: str) -> None:
    """List the routes."""
    with open_store(db) as store:
        found = store.list_routes()
    if as_json:
        for route in found:
            echo_json(_route_json(route))
        return
    click.echo(
        table(
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


# -- calls, serve (their own modules) and the RTP relay (kx_sipd/relay_cli.py) ---

main.add_command(calls)
main.add_command(serve)
main.add_command(relay)
main.add_command(status)
main.add_command(bans)
calls.add_command(calls_pcap)


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
