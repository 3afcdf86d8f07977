"""``kx-sipd calls``: list and export call records (text, JSON lines, CSV)
and show one call with its SIP ladder."""

from __future__ import annotations

import csv
from typing import Any

import attrs
import click

from sansio_sip import CallRecordData, MediaStats

from ._cli_common import (
    CONTEXT,
    TimeType,
    cell,
    db_option,
    echo_json,
    open_store,
    operator_errors,
    table,
    utc,
)
from .store import CallEntry, NotFound

__all__ = ["calls"]

# -- calls -------------------------------------------------------------------

_CSV_MEDIA = tuple(field.name for field in attrs.fields(MediaStats))
_CSV_COLUMNS = (
    *(field.name for field in attrs.fields(CallRecordData) if field.name != "ladder"),
    "duration",
    "billable",
    *(f"a_{name}" for name in _CSV_MEDIA),
    *(f"b_{name}" for name in _CSV_MEDIA),
)


@click.group(context_settings=CONTEXT)
def calls() -> None:
    """Call records: list, filter, export (JSON lines or CSV), and show one with its SIP ladder."""


def _call_json(entry: CallEntry, *, ladder: bool) -> dict[str, Any]:
    record = entry.record
    data = attrs.asdict(record)
    if not ladder:
        del data["ladder"]
    data["start"] = utc(record.start_wall)
    data["answer"] = utc(record.answer_wall)
    data["end"] = utc(record.end_wall)
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
@click.option("--since", type=TimeType(), help="Calls started at or after TIME (ISO 8601 / epoch).")
@click.option("--until", type=TimeType(), help="Calls started before TIME.")
@click.option("--call-id", help="Only the call with this Call-ID (client or carrier leg).")
@click.option(
    "--limit", type=click.IntRange(min=0), default=100, show_default=True, help="0: no limit."
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines (one record per line).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@db_option()
@operator_errors
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
    with open_store(db) as store:
        entries = store.list_calls(
            account=account, since=since, until=until, call_id=call_id, limit=limit or None
        )
    if as_json:
        for entry in entries:
            echo_json(_call_json(entry, ladder=False))
    elif as_csv:
        out = click.get_text_stream("stdout")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        writer.writerows(_call_csv_row(entry) for entry in entries)
    else:
        click.echo(
            table(
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
                        utc(entry.record.start_wall),
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
        ("start", utc(record.start_wall)),
        ("answer", utc(record.answer_wall)),
        ("end", utc(record.end_wall)),
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
        click.echo(f"{name.ljust(width)}  {cell(value)}")
    click.echo(f"\nSIP ladder ({len(record.ladder)} messages):")
    for item in record.ladder:
        arrow = "<-" if item.direction == "in" else "->"
        lines = item.message.replace("\r\n", "\n").rstrip("\n").split("\n")
        click.echo(
            f"  {utc(item.wall)}  leg {item.leg}  {arrow} {item.peer} {item.transport}  {lines[0]}"
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
@db_option()
@operator_errors
def calls_show(call_id: str, as_json: bool, summary: bool, db: str) -> None:
    """Show the call with CALL-ID (client or carrier leg, or the call reference)
    and its SIP ladder: every message in and out, with UTC time, leg and peer."""
    with open_store(db) as store:
        entries = store.list_calls(call_id=call_id, limit=None)
    if not entries:
        raise NotFound(f"no call with Call-ID {call_id!r}")
    for index, entry in enumerate(entries):
        if as_json:
            echo_json(_call_json(entry, ladder=True))
            continue
        if index:
            click.echo("")
        _show_call(entry, messages=not summary)
