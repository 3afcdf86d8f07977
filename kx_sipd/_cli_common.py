"""Helpers shared by the ``kx-sipd`` commands: the --db option, operator
errors as one clear line, output formatting, and the parameter types."""

from __future__ import annotations

import datetime
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import click
import orjson

from sansio_sip import Address, StoreUnavailable

from .settings import (
    DEFAULT_DB,
    parse_address,
    parse_port_range,
)
from .store import Store, StoreError

__all__ = [
    "CONTEXT",
    "AddressType",
    "F",
    "PortRangeType",
    "TimeType",
    "cell",
    "db_option",
    "echo_json",
    "open_store",
    "operator_errors",
    "password_option",
    "read_password",
    "table",
    "utc",
]

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- shared helpers ----------------------------------------------------------


def db_option(default: str | None = DEFAULT_DB) -> Callable[[F], F]:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False),
        default=default,
        envvar="KX_DB",
        show_envvar=True,
        help=f"The SQLite database [default: ./{DEFAULT_DB}].",
    )


def operator_errors(function: F) -> F:
    """Turn store errors into one clear ``Error:`` line and exit status 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (StoreError, StoreUnavailable) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps loses the signature


def open_store(db: str, *, create: bool = False, realm: str | None = None) -> Store:
    if not create and not os.path.exists(db):
        raise click.ClickException(
            f"no database at {os.path.abspath(db)}: create one with `kx-sipd accounts add` "
            "or `kx-sipd routes add`, or name another with --db / KX_DB"
        )
    return Store(db, realm=realm, create=create)


def echo_json(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode())


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[cell(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value) or "any"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def utc(wall: float | None) -> str | None:
    if wall is None:
        return None
    moment = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_password(password: str) -> str:
    """``-`` means: the first line of standard input (for scripts)."""
    if password == "-":
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.BadParameter("the password must not be empty", param_hint="--password")
    return password


password_option = click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="The SIP password ('-' reads it from standard input; prompted when omitted). "
    "Only its HA1 is stored.",
)


class TimeType(click.ParamType[float]):
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


class AddressType(click.ParamType[Address]):
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


class PortRangeType(click.ParamType[tuple[int, int]]):
    name = "FIRST-LAST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_port_range(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
