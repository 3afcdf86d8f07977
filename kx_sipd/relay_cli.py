"""``kx-sipd relay …``: run a standalone RTP relay, and read a relay's figures.

``kx-sipd relay serve`` runs the supervisor and its shards in the
foreground (another host, or beside a kx-sipd started with
``--relay HOST:PORT``); ``kx-sipd relay stats`` asks a running relay's
control port for per-shard and per-call figures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson

from rtp_relay import RelayClient, RelayConfig, run_supervisor
from sansio_sip import MediaUnavailable

from ._cli_common import CONTEXT

__all__ = ["relay"]

SECRET_ENV = "KX_RELAY_SECRET"


def _address(value: str, default_port: int) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or HOST alone."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HOST:PORT") from None


def _range(value: str) -> tuple[int, int]:
    lo, _sep, hi = value.partition("-")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not A-B (e.g. 20000-20999)") from None


def _secret(secret: str | None, secret_file: Path | None) -> bytes:
    if secret_file is not None:
        value = secret_file.read_bytes().strip()
    elif secret is not None:
        value = secret.encode()
    else:
        raise click.UsageError(f"give the shared secret: --secret, --secret-file or ${SECRET_ENV}")
    if len(value) < 16:
        raise click.UsageError("the relay secret must be at least 16 bytes")
    return value


_secret_options = [
    click.option(
        "--secret",
        envvar=SECRET_ENV,
        help=f"Shared control secret (at least 16 bytes; also ${SECRET_ENV}).",
    ),
    click.option(
        "--secret-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Read the shared control secret from this file.",
    ),
]


def _with_secret(func: Any) -> Any:
    for option in reversed(_secret_options):
        func = option(func)
    return func


@click.group(context_settings=CONTEXT)
def relay() -> None:
    """The RTP relay: run it standalone, or read its figures."""


@relay.command(context_settings=CONTEXT)
@click.option(
    "--control",
    default="127.0.0.1:22220",
    show_default=True,
    help="Shared control address (every shard binds it); shard i also answers on PORT+1+i.",
)
@click.option("--rtp-range", default="20000-20999", show_default=True, help="RTP port range A-B.")
@click.option(
    "--relay-shards",
    "--shards",
    "shards",
    type=click.IntRange(min=1),
    default=None,
    help="Shard processes [default: one per CPU].",
)
@click.option(
    "--media-host",
    default="0.0.0.0",
    show_default=True,
    help="Address the RTP sockets bind to.",
)
@click.option(
    "--rtp-address",
    default="127.0.0.1",
    show_default=True,
    help="Media address advertised in SDP (the public one behind 1:1 NAT); never a wildcard.",
)
@click.option(
    "--media-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds without RTP in either direction before a call is reported.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@_with_secret
def serve(
    control: str,
    rtp_range: str,
    shards: int | None,
    media_host: str,
    rtp_address: str,
    media_timeout: float,
    log_level: str,
    secret: str | None,
    secret_file: Path | None,
) -> None:
    """Run a standalone relay in the foreground until SIGINT/SIGTERM."""
    try:
        config = RelayConfig(
            secret=_secret(secret, secret_file),
            control=_address(control, 22220),
            rtp_range=_range(rtp_range),
            shards=shards,
            media_host=media_host,
            advertised=rtp_address,
            media_timeout=media_timeout,
            log_level=log_level,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run_supervisor(config))


@relay.command(context_settings=CONTEXT)
@click.option(
    "--control",
    default="127.0.0.1:22220",
    show_default=True,
    help="The relay's shared control address.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per shard and per call.")
@click.option("--calls/--no-calls", default=True, show_default=True, help="List calls too.")
@click.option("--timeout", type=float, default=0.5, show_default=True, help="Seconds per attempt.")
@_with_secret
def stats(
    control: str,
    as_json: bool,
    calls: bool,
    timeout: float,
    secret: str | None,
    secret_file: Path | None,
) -> None:
    """Print a running relay's per-shard and per-call figures."""
    client = RelayClient(_address(control, 22220), _secret(secret, secret_file), timeout=timeout)
    try:
        shards = client.shard_stats()
        per_shard = {
            s["index"]: client.shard_calls(s["index"]) if calls and "error" not in s else []
            for s in shards
        }
    except MediaUnavailable as exc:
        # A relay drops a command with a wrong secret without replying (and
        # counts it as control-bad-tag), so silence has two usual causes.
        raise click.ClickException(
            f"{exc} (is it running there, with this --secret? A command with a wrong "
            "secret gets no reply)"
        ) from None
    finally:
        client.close()
    if as_json:
        for shard in shards:
            record = {k: v for k, v in shard.items() if k not in ("c", "ok")}
            click.echo(orjson.dumps({"shard": record}).decode())
        for index, entries in per_shard.items():
            for entry in entries:
                click.echo(orjson.dumps({"shard_index": index, "call": entry}).decode())
        return
    click.echo(
        f"{'shard':>5} {'pid':>7} {'restarts':>8} {'rtp':>11} {'calls':>5} {'free':>5} "
        f"{'pkts_in':>10} {'pkts_out':>10} {'foreign':>7} {'bad':>5} {'no_peer':>7}"
    )
    for shard in shards:
        if "error" in shard:
            click.echo(f"{shard['index']:>5} {shard['error']}")
            continue
        media = shard.get("media", {})
        lo, hi = shard["rtp"] or ("-", "-")
        ports = f"{lo}-{hi}"
        click.echo(
            f"{shard['index']:>5} {shard['pid']:>7} {shard['restarts']:>8} {ports:>11} "
            f"{shard['calls']:>5} {shard['free_pairs']:>5} {media.get('packets_in', 0):>10} "
            f"{media.get('packets_out', 0):>10} {media.get('dropped_foreign', 0):>7} "
            f"{media.get('dropped_malformed', 0):>5} {media.get('dropped_no_peer', 0):>7}"
        )
    if not calls:
        return
    click.echo("")
    click.echo(
        f"{'call':<24} {'shard':>5} {'ports':>11} {'leg':>3} {'in':>8} {'out':>8} "
        f"{'lost':>6} {'jitter_ms':>9} {'foreign':>7} {'idle_s':>7} {'peer':<22}"
    )
    for index, entries in per_shard.items():
        for entry in entries:
            for leg in ("a", "b"):
                side = entry.get(leg)
                if side is None:
                    continue
                rtp = side["rtp"]
                peer = f"{rtp['peer'][0]}:{rtp['peer'][1]}" if rtp["peer"] else "-"
                idle = rtp.get("idle")  # this leg's own last packet; None: nothing yet
                ports = f"{entry['a_port']}/{entry['b_port']}"
                flag = " TIMED-OUT" if entry["timed_out"] else ""
                click.echo(
                    f"{entry['call'][:24]:<24} {index:>5} {ports:>11} {leg.upper():>3} "
                    f"{rtp['packets_in']:>8} {rtp['packets_out']:>8} {rtp['packets_lost']:>6} "
                    f"{rtp['jitter_ms']:>9} {rtp['dropped_foreign']:>7} {'-' if idle is None else idle:>7} "
                    f"{peer:<22}{flag}"
                )
