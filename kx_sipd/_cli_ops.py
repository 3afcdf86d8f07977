"""``kx-sipd status``, ``kx-sipd bans list|clear`` (through a running server's
control endpoint, kx_sipd/control.py) and ``kx-sipd calls pcap`` (a call's
SIP ladder as a pcap file, from the database)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import click

from sansio_sip import Address

from ._cli_common import (
    CONTEXT,
    AddressType,
    F,
    cell,
    db_option,
    echo_json,
    open_store,
    operator_errors,
    table,
)
from .control import DEFAULT_CONTROL, ControlError, control_request
from .settings import format_address
from .store import NotFound
from .trace import ladder_frames, server_address, write_pcap

__all__ = ["bans", "calls_pcap", "status"]

_DEFAULT = format_address(DEFAULT_CONTROL)


def control_option() -> Callable[[F], F]:
    return click.option(
        "--control",
        type=AddressType(),
        default=_DEFAULT,
        show_default=True,
        envvar="KX_CONTROL",
        show_envvar=True,
        metavar="HOST:PORT",
        help="The server's control endpoint: its --metrics address, or the default one.",
    )


def _ask(address: Address, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        status_code, answer = control_request(address, method, path, body)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if status_code != 200:
        error = answer.get("error") if isinstance(answer, dict) else answer
        raise click.ClickException(f"{format_address(address)}{path}: {status_code} {error}")
    return answer


# -- status ------------------------------------------------------------------


@click.command(context_settings=CONTEXT)
@control_option()
@click.option("--json", "as_json", is_flag=True, help="The whole status as one JSON object.")
def status(control: Address, as_json: bool) -> None:
    """What the running server is doing: uptime, health, calls up, per-route counts,
    relay shards, bans and accounts shared between devices (read from its control
    endpoint, which answers loopback clients only)."""
    answer = _ask(control, "GET", "/status")
    if as_json:
        echo_json(answer)
        return
    click.echo(_status_text(answer))


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def _status_text(answer: dict[str, Any]) -> str:
    server = answer.get("server", {})
    health = answer.get("health", {})
    engine = server.get("driver") or "?"
    if server.get("backend"):
        engine += f"/{server['backend']}"
    lines = [
        f"kx-sipd {server.get('version', '?')} ({engine}), pid {server.get('pid')}, "
        f"up {_duration(float(server.get('uptime_s', 0)))} since {server.get('started')}",
        f"listen {' '.join(server.get('listen', []))}  advertised {server.get('sip_address')}",
    ]
    down = health.get("down", [])
    if down:
        reasons = "; ".join(f"{name}: {health.get(name, {}).get('error', 'down')}" for name in down)
        lines.append(f"health: DOWN ({reasons})")
    else:
        lines.append("health: ok (SIP port, store, relay)")
    if "error" in answer:
        lines.append(f"engine figures unavailable: {answer['error']}")
    calls = answer.get("calls")
    if calls is not None:
        lines.append(
            f"calls up: {calls['up']}  (since start: {calls['started']} started, "
            f"{calls['answered']} answered)"
        )
    routes = answer.get("routes", {})
    if routes:
        lines += [
            "",
            table(
                ("ROUTE", "UP", "ATTEMPTS", "ANSWERED", "FAILED (by status)"),
                (
                    (
                        name,
                        figures["up"],
                        figures["attempts"],
                        figures["answers"],
                        " ".join(f"{code}:{n}" for code, n in figures["failures"].items()) or "-",
                    )
                    for name, figures in routes.items()
                ),
            ),
        ]
    relay = answer.get("relay")
    if relay is not None:
        shards = relay.get("shards", [])
        state = "up" if relay.get("up") else f"DOWN ({relay.get('error')})"
        lines += ["", f"relay: {state}, {len(shards)} shard(s)"]
        if shards:
            lines.append(
                table(
                    (
                        "SHARD",
                        "UP",
                        "CALLS",
                        "FREE-PAIRS",
                        "PKTS-IN",
                        "PKTS-OUT",
                        "LOST",
                        "JITTER-MS",
                    ),
                    (
                        (
                            shard["index"],
                            "yes" if shard["up"] else "no",
                            shard.get("calls"),
                            shard.get("free_pairs"),
                            shard.get("packets_in"),
                            shard.get("packets_out"),
                            shard.get("packets_lost"),
                            shard.get("jitter_ms_mean"),
                        )
                        for shard in shards
                    ),
                )
            )
    bans_now = answer.get("bans")
    if bans_now is not None:
        lines += ["", f"bans: {len(bans_now)}"]
        if bans_now:
            lines.append(
                table(("IP", "SECONDS-LEFT"), ((b["ip"], b["seconds_left"]) for b in bans_now))
            )
    shared = answer.get("shared_accounts")
    if shared is not None:
        devices = answer.get("devices", {})
        lines += [
            "",
            f"accounts used from several addresses: {len(shared)}  (since start: "
            f"{devices.get('sharing_seen', 0)} requests from a second address, "
            f"{devices.get('second_refused', 0)} refused)",
        ]
        if shared:
            lines.append(
                table(
                    ("ACCOUNT", "ADDRESSES"),
                    ((s["account"], " ".join(s["addresses"])) for s in shared),
                )
            )
    return "\n".join(lines)


# -- bans --------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def bans() -> None:
    """Sources banned for failed authentications (per IP; see serve --ban-failures):
    list them, or lift them, on the running server."""


@bans.command("list")
@control_option()
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one ban per line.")
def bans_list(control: Address, as_json: bool) -> None:
    """The banned IP addresses and the seconds each ban has left."""
    answer = _ask(control, "GET", "/bans")
    entries = answer.get("bans", [])
    if as_json:
        for entry in entries:
            echo_json(entry)
        return
    if not entries:
        click.echo("no bans")
        return
    click.echo(
        table(("IP", "SECONDS-LEFT"), ((entry["ip"], entry["seconds_left"]) for entry in entries))
    )


@bans.command("clear")
@click.argument("ip", required=False)
@control_option()
def bans_clear(ip: str | None, control: Address) -> None:
    """Lift the ban on IP, or every ban when IP is omitted."""
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise click.BadParameter(f"{ip!r} is not an IP address", param_hint="IP") from None
    answer = _ask(control, "POST", "/bans/clear", {"ip": ip})
    count = int(answer.get("cleared", 0))
    what = f"on {ip}" if ip else "in all"
    click.echo(f"{count} ban{'s' if count != 1 else ''} lifted ({what})")


# -- calls pcap --------------------------------------------------------------


@click.command("pcap", context_settings=CONTEXT)
@click.argument("call_id", metavar="CALL-ID")
@click.option(
    "-o",
    "--output",
    type=click.File("wb"),
    required=True,
    help="The pcap file to write ('-' for standard output, e.g. piped into Wireshark).",
)
@click.option(
    "--local",
    type=AddressType(default_port=5060),
    metavar="HOST[:PORT]",
    help="The server's own SIP address in the capture [default: the Via kx-sipd wrote "
    "in the call's requests, else 127.0.0.1:5060].",
)
@db_option()
@operator_errors
def calls_pcap(call_id: str, output: Any, local: Address | None, db: str) -> None:
    """Write the SIP ladder of the call with CALL-ID (client or carrier leg, or the call
    reference) as a pcap file: one Ethernet/IP/UDP or TCP frame per message, with the
    addresses, ports and times of the record, for Wireshark or sngrep."""
    with open_store(db) as store:
        entries = store.list_calls(call_id=call_id, limit=None)
    if not entries:
        raise NotFound(f"no call with Call-ID {call_id!r}")
    records = [entry.record for entry in entries]
    ours = local or server_address(records) or ("127.0.0.1", 5060)
    count = write_pcap(output, ladder_frames(records, ours=ours))
    if output.name != "<stdout>":
        click.echo(
            f"{count} SIP message{'s' if count != 1 else ''} of {len(records)} call(s) written "
            f"to {output.name} (server side {cell(format_address(ours))})",
            err=True,
        )
