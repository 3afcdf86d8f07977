"""Calls over the wire, once per driver: the guide's call (§5, §6.2), hang-ups both ways,
CANCEL, re-INVITE, carrier failures, the INVITE rows of §9, retransmissions, TCP, 503.

Every test runs against the real ``kx-sipd serve`` once per driver (conftest.py). The
server's database is the conformance one with ``alice`` routed to a carrier of this
module (a Python UAS on loopback, started before any server routes to it) and allowed
destinations starting with ``1``; each test dials digits of its own so the carrier can
tell the calls apart, and one server per driver serves the whole module. Only the 503
test, which breaks the store, gets a server of its own.

The call flows reuse tests/interop/media_support.py: its softphone (``SipClient``: 401,
ACK, INVITE with credentials, ACK, CANCEL, BYE) and its carrier (``Carrier``: 100/180/200
with SDP, CANCEL, BYE). The subclasses below add only what these tests script: a
carrier that fails, stays silent, answers a re-INVITE or hangs up; a softphone that can
retransmit what it sent, send a re-INVITE, or talk over one TCP connection.
"""

from __future__ import annotations

import itertools
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import orjson
import pytest
from conftest import (
    ACCOUNTS,
    REALM,
    SUSPENDED,
    SipResponse,
    SipServer,
    challenge_params,
    copy_database,
    digest_response,
    run_cli,
    split_stream,
)
from interop import media_support as media
from interop.media_support import SipMessage, contact_uri, make_sdp, response_to, tag_of
from test_register_options import _break_accounts

from sansio_sip import compute_ha1

HOST = "127.0.0.1"
SIP_WAIT = 10.0  # every SIP wait is bounded by this; the machine may be busy
RECORD_WAIT = 15.0
CLIENT_MEDIA_PORT = 40000  # written in offers only: no RTP flows in these tests
CARRIER_MEDIA_PORT = 40100
ALLOWED_PREFIX = "1"
TIMER_B = 64 * 0.5  # RFC 3261 §17.1.1.2: 64*T1, T1 = 500 ms (the server has no T1 setting)

T = TypeVar("T")

_numbers = itertools.count(random.randrange(1_000_000, 8_000_000))


def new_digits() -> str:
    """A fresh destination in the allowed prefix, so the carrier can tell calls apart."""
    return f"{ALLOWED_PREFIX}555{next(_numbers):07d}"


def _token() -> str:
    return f"{random.getrandbits(64):016x}"


# ------------------------------------------------------------------ the carrier


class ScriptedCarrier(media.Carrier):
    """media_support's carrier, keeping every message it receives, and able to fail a
    call, stay silent, answer a re-INVITE (mirroring the offer's direction) and hang up."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[str, tuple[int, str]] = {}
        self.silent: set[str] = set()
        self.requests: list[SipMessage] = []
        self.responses: list[SipMessage] = []

    def fail(self, digits: str, status: int, reason: str) -> None:
        """Answer an INVITE for ``digits`` with 100 and then ``status``."""
        with self._changed:
            self.failures[digits] = (status, reason)

    def ignore(self, digits: str) -> None:
        """Never answer an INVITE for ``digits`` (nor its retransmissions)."""
        with self._changed:
            self.silent.add(digits)

    def until(self, found: Callable[[], T | None], what: str, wait: float = SIP_WAIT) -> T:
        """The first non-None value of ``found`` (called under the carrier's lock)."""
        deadline = time.monotonic() + wait
        with self._changed:
            while True:
                value = found()
                if value is not None:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m.start for m in self.requests[-10:]]
                    raise AssertionError(f"carrier: no {what} within {wait} s; saw {seen}")
                self._changed.wait(left)

    def received(self, call_id: str, method: str) -> list[SipMessage]:
        """The requests of ``method`` received in the call ``call_id``."""
        with self._changed:
            return [m for m in self.requests if m.call_id == call_id and m.method == method]

    def invites_for(self, digits: str) -> list[SipMessage]:
        """Every INVITE (retransmissions too) asking for ``digits``."""
        with self._changed:
            return [m for m in self.requests if m.method == "INVITE" and m.request_user == digits]

    def send_bye(self, digits: str) -> str:
        """Hang up the answered call for ``digits``: a BYE in its dialog, sent to the
        remote target (RFC 3261 §12.2.1.1, §15.1.1). Returns the BYE's CSeq value."""
        with self._changed:
            call = self.calls[digits]
        invite = call.invite
        target = contact_uri(invite.header("contact"))
        hostport = target.split(":", 1)[1].split("@", 1)[-1].split(";", 1)[0]
        host, _, port = hostport.partition(":")
        lines = [
            f"BYE {target} SIP/2.0",
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{_token()}",
            "Max-Forwards: 70",
            f"From: {invite.header('to')};tag={call.tag}",
            f"To: {invite.header('from')}",
            f"Call-ID: {invite.call_id}",
            "CSeq: 1 BYE",
            "Content-Length: 0",
        ]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), (host, int(port or 5060)))
        return "1 BYE"

    def response(self, call_id: str, cseq: str, wait: float = SIP_WAIT) -> SipMessage:
        """The final response received in ``call_id`` to the request with ``cseq``."""
        return self.until(
            lambda: next(
                (
                    m
                    for m in self.responses
                    if m.call_id == call_id and m.header("cseq") == cseq and m.status >= 200
                ),
                None,
            ),
            f"final response to {cseq}",
            wait,
        )

    def _handle(self, message: SipMessage, source: tuple[str, int]) -> None:
        if message.is_response:
            self.responses.append(message)
            return
        self.requests.append(message)
        call = self._call_of(message)
        if message.method == "INVITE":
            if call is not None and tag_of(message.header("to")) is not None:
                self._answer_reinvite(message, call, source)
                return
            digits = message.request_user
            if call is None and digits in self.silent:
                return
            if call is None and digits in self.failures:
                status, reason = self.failures[digits]
                tag = _token()[:8]
                self.sock.sendto(response_to(message, 100, "Trying"), source)
                answer = response_to(message, status, reason, to_tag=tag)
                self.calls[digits] = media.CarrierCall(invite=message, answer=answer, tag=tag)
                self.sock.sendto(answer, source)
                return
        super()._handle(message, source)

    def _answer_reinvite(
        self, message: SipMessage, call: media.CarrierCall, source: tuple[str, int]
    ) -> None:
        """200 to a re-INVITE (RFC 3264 §8.4: hold is answered recvonly)."""
        offer = message.body.decode(errors="replace")
        direction = "recvonly" if "a=sendonly" in offer else "sendrecv"
        port = self.media_ports[call.invite.request_user]
        body = make_sdp(port, user="carrier", payloads=(0, 101))
        body = body.replace(b"a=sendrecv", f"a={direction}".encode())
        contact = f"Contact: <sip:carrier@{HOST}:{self.port}>"
        answer = response_to(
            message, 200, "OK", extra=(contact, "Content-Type: application/sdp"), body=body
        )
        self.sock.sendto(answer, source)


# ------------------------------------------------------------------ the softphone


class Phone(media.SipClient):
    """media_support's softphone as ``alice`` of the conformance database; it keeps the
    bytes it sent (to retransmit them exactly) and can send a re-INVITE."""

    def __init__(self, server: tuple[str, int], password: str = ACCOUNTS["alice"]) -> None:
        super().__init__(server)
        self.ha1 = compute_ha1(media.USER, REALM, password)
        self.sent: list[bytes] = []

    def _send(self, text: str, body: bytes = b"") -> None:
        data = text.encode() + body
        self.sent.append(data)
        self.transmit(data)

    def transmit(self, data: bytes) -> None:
        """Put ``data`` on the wire as it is (a retransmission: same bytes, same branch)."""
        self.sock.sendto(data, self.server)

    def last_sent(self, method: str) -> bytes:
        return next(data for data in reversed(self.sent) if data.startswith(method.encode()))

    def responses(self, cseq: str) -> list[SipMessage]:
        """The responses received so far to the request with ``cseq``, in order."""
        return [m for m in self.received if m.is_response and m.header("cseq") == cseq]

    def reinvite(self, sdp: bytes, wait: float = SIP_WAIT) -> SipMessage:
        """A re-INVITE in the call's dialog (RFC 3261 §14.1); its final response, ACKed."""
        self.cseq += 1
        cseq = self.cseq
        extra = (f"Contact: <sip:{media.USER}@{HOST}:{self.port}>", "Content-Type: application/sdp")
        target, to = self.remote_target, self.remote_to
        self._request("INVITE", target, cseq=cseq, branch=_token(), to=to, extra=extra, body=sdp)
        final = self.expect(
            lambda m: (
                m.is_response
                and m.status >= 200
                and m.call_id == self.call_id
                and m.header("cseq") == f"{cseq} INVITE"
            ),
            wait,
        )
        if 200 <= final.status < 300:
            self._request("ACK", target, cseq=cseq, branch=_token(), to=to)
        return final


class TcpPhone(Phone):
    """The same softphone on one TCP connection to the server (guide §2: UDP or TCP).

    It listens nowhere: whatever reaches it, the server sent over this connection."""

    def __init__(self, server: tuple[str, int]) -> None:
        super().__init__(server)
        self.sock.close()
        self.sock = socket.create_connection(server, timeout=SIP_WAIT)
        self.port = int(self.sock.getsockname()[1])
        self.buffer = b""

    def _send(self, text: str, body: bytes = b"") -> None:
        # media_support writes UDP in Via and no transport in Contact (RFC 3261 §18.1.1).
        text = text.replace("SIP/2.0/UDP ", "SIP/2.0/TCP ", 1)
        text = text.replace(f"@{HOST}:{self.port}>", f"@{HOST}:{self.port};transport=tcp>", 1)
        super()._send(text, body)

    def transmit(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, wait: float) -> SipMessage | None:
        deadline = time.monotonic() + wait
        while True:
            messages, _rest = split_stream(self.buffer)
            if messages:
                self.buffer = self.buffer[len(messages[0]) :]
                message = SipMessage.parse(messages[0], self.server)
                self.received.append(message)
                if not message.is_response and message.method == "BYE":
                    self.byes.append(message)
                    self.sock.sendall(response_to(message, 200, "OK"))
                return message
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65535)
            except TimeoutError:
                return None
            if not chunk:
                raise AssertionError("the server closed the client's TCP connection")
            self.buffer += chunk


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def carrier() -> Iterator[ScriptedCarrier]:
    running = ScriptedCarrier().start()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def template_db(
    template_db: Path, carrier: ScriptedCarrier, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """conftest's accounts, with alice routed to this module's carrier (which listens
    already) and allowed only destinations starting with ALLOWED_PREFIX. Overrides
    conftest's ``template_db``, so its ``server`` and ``fresh_server`` serve calls."""
    db = copy_database(template_db, tmp_path_factory.mktemp("kx-calls-template"))
    run_cli(db, "routes", "add", "carrier", "--host", HOST, "--port", str(carrier.port))
    run_cli(db, "accounts", "set", "alice", "--route", "carrier", "--allow", ALLOWED_PREFIX)
    return db


class SilentCall:
    """A call placed to a carrier that never answers; its 408 comes after Timer B."""

    def __init__(self, server: SipServer, carrier: ScriptedCarrier) -> None:
        self.digits = new_digits()
        carrier.ignore(self.digits)
        self.phone = Phone(server.address)
        self.phone.send_invite(self.digits, make_sdp(CLIENT_MEDIA_PORT))
        self.placed = time.monotonic()


@pytest.fixture(scope="module", autouse=True)
def silent_call(server: SipServer, carrier: ScriptedCarrier) -> Iterator[SilentCall]:
    """Placed when each driver's server starts, so Timer B's 32 s (the server has no T1
    setting to shorten it) run while the module's other tests do; the last test of this
    file collects the 408. Every driver is checked at the cost of one wait, not three."""
    call = SilentCall(server, carrier)
    try:
        yield call
    finally:
        call.phone.close()


def rtp_range(server: SipServer) -> tuple[int, int]:
    """The server's relay port range, as conftest started it."""
    args = [str(arg) for arg in server.process.args]
    low, _, high = args[args.index("--rtp-range") + 1].partition("-")
    return int(low), int(high)


def finished_record(
    server: SipServer, call_id: str, wait: float = RECORD_WAIT
) -> dict[str, object]:
    """``kx-sipd calls list --call-id CALL_ID --json``: the call's one record, once ended
    (polled: the record is written when the call ends, a moment after the last answer)."""
    deadline = time.monotonic() + wait
    while True:
        output = server.cli("calls", "list", "--call-id", call_id, "--json").stdout
        records = [orjson.loads(line) for line in output.splitlines() if line.strip()]
        if records and records[0].get("end_wall") is not None:
            assert len(records) == 1, records
            return dict(records[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished record for {call_id}: {records}")
        time.sleep(0.3)


def answered_call(
    server: SipServer, carrier: ScriptedCarrier, phone: Phone
) -> tuple[str, SipMessage]:
    """A call from ``phone`` answered by the carrier (guide §6.2): (digits, the 200)."""
    digits = new_digits()
    carrier.expect(digits, CARRIER_MEDIA_PORT)
    final = phone.invite(digits, make_sdp(CLIENT_MEDIA_PORT))
    assert final.status == 200, final.start
    carrier.wait(digits, lambda call: call.acked)
    return digits, final


def first_statuses(responses: list[SipMessage]) -> list[int]:
    """Status codes in the order first seen (retransmissions of one answer fold)."""
    return list(dict.fromkeys(m.status for m in responses))


def invite_as(server: SipServer, user: str, password: str, digits: str) -> SipMessage:
    """An INVITE from ``user`` with ``password`` answered as the guide's §6.2 says: the
    401, its ACK, the INVITE with credentials. Returns its final response (ACKed).

    conftest's client is used here, not the Phone (which is always alice): its requests
    name any user, and it shares no code with the server's digest."""
    uri = f"sip:{digits}@{REALM}"
    body = make_sdp(CLIENT_MEDIA_PORT)
    sdp = ("Content-Type", "application/sdp")
    with server.client() as client:
        first = client.final(client.request("INVITE", uri, user=user, headers=(sdp,), body=body))
        assert first.status == 401, first.raw
        _ack(client.send, first, uri)
        nonce = challenge_params(first.header("WWW-Authenticate") or "")["nonce"]
        digest = digest_response(user, password, "INVITE", uri, nonce)
        authorization = (
            f'Digest username="{user}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
            f'response="{digest}", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"'
        )
        request = client.request(
            "INVITE", uri, user=user, headers=(("Authorization", authorization), sdp), body=body
        )
        final = client.final(request)
        _ack(client.send, final, uri)
        return SipMessage.parse(final.raw, server.address)


def _ack(send: Callable[[bytes], None], response: SipResponse, uri: str) -> None:
    """The ACK of a non-2xx final answer (RFC 3261 §17.1.1.3): the INVITE's branch, the
    answer's To."""
    answer = SipMessage.parse(response.raw, ("", 0))
    via = answer.all("via")[0]
    sent_by = via.split(";", 1)[0]
    branch = re.search(r";branch=([^;]+)", via)
    assert branch is not None, via
    lines = [
        f"ACK {uri} SIP/2.0",
        f"Via: {sent_by};branch={branch.group(1)};rport",
        "Max-Forwards: 70",
        f"From: {answer.header('from')}",
        f"To: {answer.header('to')}",
        f"Call-ID: {answer.call_id}",
        f"CSeq: {answer.header('cseq').split()[0]} ACK",
        "Content-Length: 0",
    ]
    send(("\r\n".join(lines) + "\r\n\r\n").encode())


# ------------------------------------------------------------------ answered calls


def test_answered_call_client_hangs_up(server: SipServer, carrier: ScriptedCarrier) -> None:
    with Phone(server.address) as phone:
        digits, final = answered_call(server, carrier, phone)
        # Guide §6.2: 401, then 100 Trying → 180 Ringing → 200 OK.
        assert first_statuses(phone.responses("1 INVITE")) == [401]
        assert phone.responses("1 INVITE")[0].start == "SIP/2.0 401 Unauthorized"
        assert first_statuses(phone.responses("2 INVITE")) == [100, 180, 200]
        assert final.header("content-type") == "application/sdp"
        bye = phone.bye()
        assert bye.status == 200, bye.start
        call = carrier.wait(digits, lambda call: call.bye is not None)
    b_call_id = call.invite.call_id
    assert b_call_id != phone.call_id  # a B2BUA: the carrier's leg is a dialog of its own
    assert call.invite.header("authorization") == ""  # the client's credentials stay here
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("client", 200), record
    assert (record["dialed"], record["a_call_id"]) == (digits, phone.call_id), record
    assert record["b_call_id"] == b_call_id, record
    assert record["account"] == "alice" and record["transport"] == "UDP", record


def test_carrier_hangs_up(server: SipServer, carrier: ScriptedCarrier) -> None:
    with Phone(server.address) as phone:
        digits, _final = answered_call(server, carrier, phone)
        b_call_id = carrier.calls[digits].invite.call_id
        cseq = carrier.send_bye(digits)
        bye = phone.wait_bye(SIP_WAIT)  # answered 200 by the phone as it is read
        assert tag_of(bye.header("to")) == phone.local_tag
        assert carrier.response(b_call_id, cseq).status == 200
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("carrier", 200), record


def test_cancel_after_ringing(server: SipServer, carrier: ScriptedCarrier) -> None:
    digits = new_digits()
    carrier.expect(digits, CARRIER_MEDIA_PORT, answer=False)
    with Phone(server.address) as phone:
        phone.send_invite(digits, make_sdp(CLIENT_MEDIA_PORT))
        phone.expect(lambda m: m.status == 180 and m.call_id == phone.call_id)
        cancelled, final = phone.cancel()
        assert (cancelled.status, final.status) == (200, 487), (cancelled.start, final.start)
        call = carrier.wait(digits, lambda call: call.cancelled and call.acked)
    # The CANCEL reached the carrier on the B-leg INVITE's branch (RFC 3261 §9.1).
    (cancel,) = carrier.received(call.invite.call_id, "CANCEL")
    assert cancel.all("via") == call.invite.all("via")
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("cancel", 487), record


def test_reinvite_from_the_client_is_relayed(server: SipServer, carrier: ScriptedCarrier) -> None:
    low, high = rtp_range(server)
    with Phone(server.address) as phone:
        digits, _final = answered_call(server, carrier, phone)
        b_call_id = carrier.calls[digits].invite.call_id
        hold = make_sdp(CLIENT_MEDIA_PORT).replace(b"a=sendrecv", b"a=sendonly")
        answer = phone.reinvite(hold)
        assert answer.status == 200, answer.start
        reinvite = carrier.until(
            lambda: next(iter(carrier.received(b_call_id, "INVITE")[1:]), None), "re-INVITE"
        )
        # Relayed in the carrier's dialog, with the relay's carrier-side address.
        offered = media.sdp_media(reinvite.body)
        assert offered.address == HOST and low <= offered.port <= high, reinvite.body
        assert b"a=sendonly" in reinvite.body
        assert tag_of(reinvite.header("to")) == carrier.calls[digits].tag
        # The carrier's answer comes back on the relay's client-side address.
        answered = media.sdp_media(answer.body)
        assert answered.address == HOST and low <= answered.port <= high, answer.body
        assert b"a=recvonly" in answer.body
        # ACK on both legs: the carrier's for the re-INVITE's CSeq.
        cseq_number = reinvite.header("cseq").split()[0]
        carrier.until(
            lambda: next(
                (
                    m
                    for m in carrier.received(b_call_id, "ACK")
                    if m.header("cseq") == f"{cseq_number} ACK"
                ),
                None,
            ),
            "ACK of the re-INVITE",
        )
        assert phone.bye().status == 200
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("client", 200), record


# ------------------------------------------------------------------ refused calls


def test_carrier_busy_is_486_to_the_client(server: SipServer, carrier: ScriptedCarrier) -> None:
    digits = new_digits()
    carrier.fail(digits, 486, "Busy Here")
    with Phone(server.address) as phone:
        final = phone.invite(digits, make_sdp(CLIENT_MEDIA_PORT))
        assert final.start == "SIP/2.0 486 Busy Here"
        carrier.wait(digits, lambda call: call.acked)  # kx-sipd ACKs the failure (§17.1.1.3)
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("carrier", 486), record


def test_offer_without_g711_is_488_with_warning(
    server: SipServer, carrier: ScriptedCarrier
) -> None:
    digits = new_digits()
    carrier.expect(digits, CARRIER_MEDIA_PORT)
    offer = "\r\n".join(
        [
            "v=0",
            f"o=phone 1 1 IN IP4 {HOST}",
            "s=-",
            f"c=IN IP4 {HOST}",
            "t=0 0",
            f"m=audio {CLIENT_MEDIA_PORT} RTP/AVP 9 96",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:96 opus/48000/2",
            "",
        ]
    ).encode()
    with Phone(server.address) as phone:
        final = phone.invite(digits, offer)
    assert final.status == 488, final.start
    # RFC 3261 §20.43: warn-code SP warn-agent SP "warn-text" (3xx: SDP trouble).
    assert re.fullmatch(r'3\d\d \S+ ".+"', final.header("warning")), final.header("warning")
    assert carrier.invites_for(digits) == []
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("rejected", 488), record


def test_wrong_password_on_invite_is_403_bad_credentials(
    server: SipServer, carrier: ScriptedCarrier
) -> None:
    digits = new_digits()
    final = invite_as(server, "alice", "not-the-password", digits)
    assert final.start == "SIP/2.0 403 Bad credentials"
    assert carrier.invites_for(digits) == []


@pytest.mark.parametrize("user", ["nobody", *SUSPENDED])
def test_unknown_or_suspended_user_on_invite_is_403_unknown_user(
    server: SipServer, carrier: ScriptedCarrier, user: str
) -> None:
    digits = new_digits()
    final = invite_as(server, user, SUSPENDED.get(user, "whatever"), digits)
    assert final.start == "SIP/2.0 403 Unknown user"
    assert carrier.invites_for(digits) == []


def test_destination_not_allowed_is_403(server: SipServer, carrier: ScriptedCarrier) -> None:
    digits = "44" + new_digits()[1:]  # outside alice's allowed prefix
    carrier.expect(digits, CARRIER_MEDIA_PORT)
    with Phone(server.address) as phone:
        final = phone.invite(digits, make_sdp(CLIENT_MEDIA_PORT))
    assert final.start == "SIP/2.0 403 Destination not allowed"
    assert carrier.invites_for(digits) == []


# ------------------------------------------------------------------ retransmissions


def test_retransmitted_invite_while_ringing_gets_the_same_180(
    server: SipServer, carrier: ScriptedCarrier
) -> None:
    """DESIGN §7: absorbed by the server transaction before authentication; RFC 3261
    §17.2.1: the most recent provisional response is sent again."""
    digits = new_digits()
    carrier.expect(digits, CARRIER_MEDIA_PORT, answer=False)
    with Phone(server.address) as phone:
        phone.send_invite(digits, make_sdp(CLIENT_MEDIA_PORT))
        invite = phone.last_sent("INVITE")

        def ringing(m: SipMessage) -> bool:
            return m.status == 180 and m.header("cseq") == "2 INVITE"

        first = phone.expect(ringing)
        phone.transmit(invite)
        again = phone.expect(ringing)
        assert (again.start, again.headers, again.body) == (first.start, first.headers, first.body)
        assert len(carrier.invites_for(digits)) == 1
        _cancelled, final = phone.cancel()
        assert final.status == 487
    assert len(carrier.invites_for(digits)) == 1


def test_retransmitted_invite_does_not_spend_the_nonce_twice(
    server: SipServer, carrier: ScriptedCarrier
) -> None:
    digits = new_digits()
    carrier.expect(digits, CARRIER_MEDIA_PORT)
    with Phone(server.address) as phone:
        phone.send_invite(digits, make_sdp(CLIENT_MEDIA_PORT))
        phone.transmit(phone.last_sent("INVITE"))  # at once: the look-up may be under way
        final = phone.final()
        assert final.status == 200, final.start
        carrier.wait(digits, lambda call: call.acked)
        assert phone.bye().status == 200
        # Not "nonce reused" (403) nor anything else: every answer to it was 100/180/200.
        assert set(first_statuses(phone.responses("2 INVITE"))) <= {100, 180, 200}
    (invite,) = carrier.invites_for(digits)
    assert not [m for m in carrier.requests if m.call_id == invite.call_id and m.method == "CANCEL"]


def test_a_2xx_is_retransmitted_until_the_client_acks_it(
    server: SipServer, carrier: ScriptedCarrier
) -> None:
    """RFC 3261 §13.3.1.4: the UAS core sends the 2xx again (T1, 2*T1, ... up to T2)
    until the ACK comes; over UDP, so a lost 200 or ACK does not lose the call."""
    digits = new_digits()
    carrier.expect(digits, CARRIER_MEDIA_PORT)
    with Phone(server.address) as phone:
        phone.send_invite(digits, make_sdp(CLIENT_MEDIA_PORT))

        def ok(m: SipMessage) -> bool:
            return m.status == 200 and m.header("cseq") == "2 INVITE"

        first = phone.expect(ok)
        again = phone.expect(ok)  # no ACK yet: the same 200 once more
        assert (again.start, again.headers, again.body) == (first.start, first.headers, first.body)
        final = phone.final()  # the next one, ACKed now
        assert final.status == 200
        carrier.wait(digits, lambda call: call.acked)
        quiet_until = time.monotonic() + 2.5  # past the next one due (T1 doubling: +2 s)
        while (left := quiet_until - time.monotonic()) > 0:
            message = phone._read(left)
            assert message is None or not ok(message), "the 200 went on after its ACK"
        assert phone.bye().status == 200


# ------------------------------------------------------------------ TCP


def test_whole_call_over_one_tcp_connection(server: SipServer, carrier: ScriptedCarrier) -> None:
    with TcpPhone(server.address) as phone:
        digits, final = answered_call(server, carrier, phone)
        assert "SIP/2.0/TCP" in final.header("via")
        cseq = carrier.send_bye(digits)
        # The phone listens nowhere: the BYE can only come over its connection.
        bye = phone.wait_bye(SIP_WAIT)
        assert bye.call_id == phone.call_id
        assert "SIP/2.0/TCP" in bye.header("via")
        assert carrier.response(carrier.calls[digits].invite.call_id, cseq).status == 200
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("carrier", 200), record
    assert record["transport"] == "TCP", record


# ------------------------------------------------------------------ store failure


def test_store_failure_on_invite_is_503_then_recovers(
    fresh_server: SipServer, carrier: ScriptedCarrier
) -> None:
    """Guide §9: 503 when the backend is down (the account table gone; see
    test_register_options), then calls go through again once it is back."""
    digits = new_digits()
    carrier.expect(digits, CARRIER_MEDIA_PORT)
    with Phone(fresh_server.address) as phone:
        _break_accounts(fresh_server.db, broken=True)
        try:
            refused = phone.invite(digits, make_sdp(CLIENT_MEDIA_PORT))
            assert refused.start == "SIP/2.0 503 Service Unavailable"
            assert refused.header("retry-after").strip().isdigit()
            assert carrier.invites_for(digits) == []
        finally:
            _break_accounts(fresh_server.db, broken=False)
        deadline = time.monotonic() + 15
        status = 0
        while status != 200 and time.monotonic() < deadline:
            status = phone.invite(digits, make_sdp(CLIENT_MEDIA_PORT)).status
        assert status == 200
        assert phone.bye().status == 200
    assert any('"store.failed"' in line for line in fresh_server.log_lines())


# ------------------------------------------------------------------ last: the silent carrier


def test_silent_carrier_is_408_after_timer_b(
    silent_call: SilentCall, carrier: ScriptedCarrier, server: SipServer
) -> None:
    """Last in this file, so the call placed when the server started has had most of
    Timer B's 32 s while the other tests ran (see ``silent_call``)."""
    phone = silent_call.phone
    left = silent_call.placed + TIMER_B + 20.0 - time.monotonic()
    final = phone.final(wait=max(left, SIP_WAIT))
    assert final.start == "SIP/2.0 408 Request Timeout"
    invites = carrier.invites_for(silent_call.digits)
    # Retransmitted by kx-sipd's client transaction (Timer A), on one branch; no CANCEL
    # before a provisional answer (RFC 3261 §9.1).
    assert len(invites) >= 2
    assert len({m.header("via") for m in invites}) == 1
    assert carrier.received(invites[0].call_id, "CANCEL") == []
    record = finished_record(server, phone.call_id)
    assert (record["ended_by"], record["final_status"]) == ("timeout", 408), record
