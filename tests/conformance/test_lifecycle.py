"""A call's end that neither party asked for, once per driver: the operator's SIGTERM or
SIGINT (calls given the grace period, then hung up on both legs, records written before
the process exits), the relay's media timeout, and a relay shard lost mid-call.

These are driver work as much as engine work: the driver turns the signal into
``stop_accepting``/``end_all_calls``, keeps serving the BYE transactions while it
drains, flushes the record writes, and polls the relay for the calls it ended on its
own (``expired()`` → ``media_ended``). Each test gets a server of its own, started
with the options it needs (a short grace period, a short media timeout, a known relay
secret), and the carrier and softphone of test_calls.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from conftest import REALM, SipServer, copy_database, start_server
from interop.media_support import make_sdp

# The module's fixtures (a carrier of its own, alice routed to it) and softphone.
from test_calls import (  # noqa: F401 (carrier and template_db are fixtures)
    CARRIER_MEDIA_PORT,
    CLIENT_MEDIA_PORT,
    SIP_WAIT,
    Phone,
    ScriptedCarrier,
    _ack,
    answered_call,
    carrier,
    finished_record,
    new_digits,
    template_db,
)

from rtp_relay import RelayClient

GRACE = 2.0
MEDIA_TIMEOUT = 1.5
RELAY_SECRET = "conformance-relay-secret"
EXIT_WAIT = 30.0

Start = Callable[..., SipServer]


@pytest.fixture
def start(
    driver: str,
    template_db: Path,  # noqa: F811 (test_calls' fixture)
    tmp_path: Path,
) -> Iterator[Start]:
    """Start a server of the test's own with extra ``kx-sipd serve`` options."""
    started: list[SipServer] = []

    def start(*extra: str) -> SipServer:
        directory = tmp_path / f"server-{len(started)}"
        directory.mkdir()
        server = start_server(driver, directory, copy_database(template_db, directory), *extra)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def log_events(server: SipServer, name: str) -> list[dict[str, object]]:
    """The ``fields`` of the server's JSON log lines of event ``name``."""
    found = []
    for line in server.log_lines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            fields = entry.get("fields")
            found.append(fields if isinstance(fields, dict) else dict(entry))
    return found


def wait_for_event(server: SipServer, name: str, wait: float = SIP_WAIT) -> None:
    deadline = time.monotonic() + wait
    while not log_events(server, name):
        assert time.monotonic() < deadline, f"no {name} in the log within {wait} s"
        time.sleep(0.02)


def exit_status(server: SipServer, wait: float = EXIT_WAIT) -> int | None:
    """The process's exit status once it has exited on its own; None if it is still up."""
    try:
        return server.process.wait(wait)
    except Exception:
        return None


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_refuses_new_calls_then_hangs_up_both_legs_and_writes_the_record(
    start: Start,
    carrier: ScriptedCarrier,  # noqa: F811 (test_calls' fixture)
    signum: signal.Signals,
) -> None:
    server = start("--shutdown-grace", str(GRACE))
    with Phone(server.address) as phone, server.client() as late:
        digits, _final = answered_call(server, carrier, phone)
        server.process.send_signal(signum)
        signalled = time.monotonic()
        wait_for_event(server, "engine.stop_accepting")  # the signal is asynchronous
        # Within the grace period the call goes on and a new one is refused (503).
        # Before authentication: nothing is looked up for a call that cannot be placed.
        sdp = (("Content-Type", "application/sdp"),)
        uri = f"sip:{new_digits()}@{REALM}"
        invite = late.request("INVITE", uri, headers=sdp, body=make_sdp(CLIENT_MEDIA_PORT))
        refused = late.final(invite)
        assert (refused.status, refused.reason) == (503, "Service Unavailable"), refused.raw
        assert (refused.header("Retry-After") or "").strip().isdigit()
        _ack(late.send, refused, uri)
        assert phone.byes == []
        # Then both legs are hung up by the server.
        bye = phone.wait_bye(GRACE + SIP_WAIT)
        assert time.monotonic() - signalled >= GRACE - 0.2, "hung up before the grace period"
        assert bye.call_id == phone.call_id
        carrier.wait(digits, lambda call: call.bye is not None)
        status = exit_status(server)
    assert status == 0, server.log_lines()[-20:]
    # The record was written before the process exited: read with the server gone.
    record = finished_record(server, phone.call_id, wait=0.0)
    assert (record["ended_by"], record["final_status"]) == ("shutdown", 200), record
    (stopped,) = log_events(server, "driver.stopped")
    assert stopped.get("records_pending", 0) == 0, stopped
    assert [fields.get("signal") for fields in log_events(server, "server.signal")] == [signum.name]
    assert not log_events(server, "record.unwritten")


def test_a_second_signal_hangs_up_at_once(
    start: Start,
    carrier: ScriptedCarrier,  # noqa: F811 (test_calls' fixture)
) -> None:
    """docs/operations.md: a second SIGTERM skips what is left of the grace period."""
    server = start("--shutdown-grace", "60")
    with Phone(server.address) as phone:
        digits, _final = answered_call(server, carrier, phone)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        phone.wait_bye(SIP_WAIT)  # not after 60 s
        carrier.wait(digits, lambda call: call.bye is not None)
        status = exit_status(server)
    assert status == 0
    record = finished_record(server, phone.call_id, wait=0.0)
    assert record["ended_by"] == "shutdown", record


# ------------------------------------------------------------------ the relay ends a call


def test_a_call_without_media_is_hung_up_after_the_media_timeout(
    start: Start,
    carrier: ScriptedCarrier,  # noqa: F811 (test_calls' fixture)
) -> None:
    """The relay times the silent call out; the driver's poll (``expired()``) tells the
    engine, which sends BYE on both legs and records ``media-timeout``."""
    server = start("--media-timeout", str(MEDIA_TIMEOUT))
    with Phone(server.address) as phone:
        digits, _final = answered_call(server, carrier, phone)
        answered = time.monotonic()
        bye = phone.wait_bye(MEDIA_TIMEOUT + SIP_WAIT)
        assert time.monotonic() - answered >= MEDIA_TIMEOUT - 0.5
        assert bye.call_id == phone.call_id
        carrier.wait(digits, lambda call: call.bye is not None)
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("media-timeout", 200), record


def test_a_call_whose_relay_shard_dies_is_hung_up_on_both_legs(
    start: Start,
    carrier: ScriptedCarrier,  # noqa: F811 (test_calls' fixture)
) -> None:
    """The shard holding the call is killed; the supervisor starts another, whose
    incarnation differs, so the driver's poll reports the call lost (``relay-lost``)."""
    server = start("--relay-secret", RELAY_SECRET)
    (started,) = log_events(server, "relay.started")
    host, port = started["control"]  # type: ignore[misc]
    client = RelayClient((str(host), int(port)), RELAY_SECRET.encode())
    try:
        with Phone(server.address) as phone:
            digits, _final = answered_call(server, carrier, phone)
            (shard,) = [s for s in client.shard_stats() if "pid" in s]
            os.kill(int(shard["pid"]), signal.SIGKILL)
            bye = phone.wait_bye(SIP_WAIT + 10)
            assert bye.call_id == phone.call_id
            carrier.wait(digits, lambda call: call.bye is not None, wait=SIP_WAIT)
    finally:
        client.close()
    record = finished_record(server, phone.call_id)
    assert record["ended_by"] == "error" and "relay" in str(record["reason"]), record
