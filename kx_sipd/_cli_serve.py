"""``kx-sipd serve``: the server's options, the TOML file, --demo, and the
hand-over of a ``ServerSettings`` to ``kx_sipd.app.run_server``."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import Any

import click

from ._cli_common import (
    CONTEXT,
    AddressType,
    F,
    PortRangeType,
    operator_errors,
)
from .settings import (
    DEFAULT_DB,
    DEFAULT_DEMO_DB,
    DEMO_PASSWORD,
    DEMO_USERNAME,
    ServerSettings,
    field_doc,
)
from .store import ECHO_ROUTE, Store

__all__ = ["build_settings", "prepare_demo", "serve"]

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


@click.command(context_settings=CONTEXT)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="TOML file of serve settings (keys as the options below, dashes or underscores); "
    "the command line and the environment win over it.",
)
@_serve_option("listen", type=AddressType(default_port=5060), multiple=True, metavar="HOST[:PORT]")
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
@_serve_option("sip_address", type=AddressType(default_port=0), metavar="HOST[:PORT]")
@_serve_option("relay", type=AddressType(), metavar="HOST:PORT")
@_serve_option("relay_shards", type=click.IntRange(min=1), metavar="N")
@_serve_option("rtp_range", type=PortRangeType(), default="20000-20999", show_default=True)
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
@_serve_option("one_device_per_account", is_flag=True)
@_serve_option("uniform_auth_failures", is_flag=True)
@_serve_option(
    "max_message_size",
    type=click.IntRange(min=1024),
    default=65_535,
    show_default=True,
    metavar="BYTES",
)
@_serve_option(
    "max_headers", type=click.IntRange(min=16), default=256, show_default=True, metavar="N"
)
@_serve_option(
    "max_via_depth", type=click.IntRange(min=1), default=64, show_default=True, metavar="N"
)
@_serve_option(
    "max_transactions", type=click.IntRange(min=1), default=20_000, show_default=True, metavar="N"
)
@_serve_option(
    "max_pending_lookups",
    type=click.IntRange(min=1),
    default=5_000,
    show_default=True,
    metavar="N",
)
@_serve_option("retry_after", type=click.IntRange(min=1), default=5, show_default=True, metavar="S")
@_serve_option(
    "ban_failures", type=click.IntRange(min=1), default=10, show_default=True, metavar="N"
)
@_serve_option(
    "ban_window",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="S",
)
@_serve_option(
    "ban_time",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    metavar="S",
)
@_serve_option("slow_after", type=click.IntRange(min=1), default=5, show_default=True, metavar="N")
@_serve_option("drop_scanners", is_flag=True)
@_serve_option("metrics", type=AddressType(), metavar="HOST:PORT")
@_serve_option("hep", type=AddressType(), metavar="HOST:PORT")
@_serve_option(
    "hep_agent_id", type=click.IntRange(min=1), default=2001, show_default=True, metavar="N"
)
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
    default=3600.0,
    show_default=True,
    metavar="S",
)
@click.pass_context
@operator_errors
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
