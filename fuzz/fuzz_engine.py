#!/usr/bin/env python3
"""atheris harness: the whole engine fed a sequence of inputs.

One fuzz input is a *script*: records of ``kind|length|payload`` (one control
byte, two length bytes big-endian, then the payload; a short last record
takes what is left). The control byte's low three bits pick the kind, the
upper bits pick a source address, a TCP connection, an account or a status:

====  ======================================================================
kind  what the harness does
====  ======================================================================
0     the payload as one UDP datagram from one of eight sources (IPv4/IPv6)
1     the payload as a TCP chunk on one of four connections
2     advance the clock by ``length`` centiseconds (no payload follows),
      firing every timer due, and answer the look-ups held back until then
3     the driver saw a TCP connection close
4     the payload, parsed as a request, re-sent with a *valid* Digest
      Authorization for one of four accounts (or a wrong password): this is
      how random inputs reach calls, not only the 401 path
5     the carrier answers the last request kx-sipd sent it (1xx/2xx/4xx/5xx,
      with an SDP answer where one belongs)
6     the payload as a UDP datagram from the carrier's address
7     the client follows up on its last call: ACK, BYE or CANCEL
====  ======================================================================

Account look-ups are answered at once from a fixed table (or held back until
the next clock step, or answered "store unavailable"); media allocations get
a fixed allocation (or fail). The invariant, checked after every record:

* no exception escapes ``receive``/``handle_timer``/the result methods;
* every ``Send`` is a SIP message the parser accepts (or a keep-alive CRLF);
* state stays within its bounds: transactions, calls, pending look-ups,
  guard entries, delayed answers, TCP framers;

and at the end, after the clock runs past every timer and call limit, the
engine holds no transaction, call or pending look-up.

    python3 fuzz/fuzz_engine.py [-max_total_time=300] [CORPUS_DIR]

The seed corpus (fuzz/corpus-out/engine/, git-ignored) is written on first use from
../shared/testdata (RFC 4475, softphone captures) plus scripted call flows.
``tests/robustness/test_fuzz_engine.py`` runs ``one_input`` over the seeds and
under hypothesis in CI.
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sansio_sip import (
    Account,
    AllocateMedia,
    CallRecord,
    CloseConnection,
    Engine,
    EngineConfig,
    GuardConfig,
    Log,
    LookupAccount,
    MediaAllocation,
    ParseError,
    ReleaseMedia,
    Request,
    Response,
    Route,
    Send,
    Transport,
    UpdateMedia,
    make_response,
    parse_message,
)
from sansio_sip._digest import (
    NonceFactory,
    answer_challenge,
    compute_ha1,
    make_authorization,
    make_challenge,
    parse_challenge,
)

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
SEEDS = REPO / "fuzz" / "corpus-out" / "engine"  # git-ignored

REALM = "sip.kx21.com"
SECRET = b"fuzz-engine-nonce-secret-32bytes"
SERVER = ("203.0.113.1", 5060)
CARRIER = ("192.0.2.50", 5060)
SOURCES: tuple[tuple[str, int], ...] = (
    ("198.51.100.7", 40000),
    ("198.51.100.7", 40002),
    ("198.51.100.8", 5060),
    ("10.0.0.9", 1),
    ("2001:db8::7", 5060),
    ("2001:db8::8", 65535),
    ("198.51.100.99", 6000),
    CARRIER,
)
CONNECTIONS = 4

KIND_UDP, KIND_TCP, KIND_TIME, KIND_CLOSE = 0, 1, 2, 3
KIND_AUTH, KIND_CARRIER_ANSWER, KIND_CARRIER_RAW, KIND_FOLLOW_UP = 4, 5, 6, 7

CONFIG = EngineConfig(
    realm=REALM,
    nonce_secret=SECRET,
    sip_address=SERVER,
    # Small bounds, so a short script can reach every one of them.
    max_transactions=24,
    max_calls=2,
    max_pending_lookups=3,
    max_delayed_answers=3,
    max_call_duration=600.0,
    max_headers=40,
    max_via_depth=8,
    max_message_size=8192,
)
CONFIG = attrs.evolve(
    CONFIG,
    guard=GuardConfig(
        failures=3, window=60.0, ban_time=120.0, user_failures=2, capacity=8, drop_scanners=True
    ),
)

PASSWORD = "s3cret"
_ROUTE = Route(name="carrier", host=CARRIER[0], port=CARRIER[1])


def _account(username: str, **extra: object) -> Account:
    return Account(
        username=username,
        ha1={"MD5": compute_ha1(username, REALM, PASSWORD)},
        route=_ROUTE,
        **extra,  # type: ignore[arg-type]
    )


ACCOUNTS: dict[str, Account | None] = {
    "alice": _account("alice"),
    "bob": _account("bob", active=False),
    "carl": _account("carl", max_calls=1, max_cps=1.0, allowed_prefixes=("1",)),
    "ghost": None,  # unknown user
}
USERNAMES = tuple(ACCOUNTS)
CARRIER_STATUSES = (100, 180, 183, 200, 200, 486, 503, 408, 487, 404)
_ERROR_STATUS_LINE = re.compile(rb"SIP/2\.0 [456]\d\d [^\r\n]*")
CARRIER_SDP = (
    b"v=0\r\no=carrier 1 1 IN IP4 192.0.2.60\r\ns=-\r\nc=IN IP4 192.0.2.60\r\n"
    b"t=0 0\r\nm=audio 30000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
)


def records(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Split a script into (control byte, length field, payload)."""
    position = 0
    while position < len(data):
        control = data[position]
        length = int.from_bytes(data[position + 1 : position + 3], "big")
        if control & 7 == KIND_TIME:
            # The length field is the time step; no payload follows.
            position += 3
            yield control, length, b""
            continue
        payload = data[position + 3 : position + 3 + length]
        position += 3 + length
        yield control, length, payload


def record(kind: int, payload: bytes = b"", *, select: int = 0, length: int | None = None) -> bytes:
    """One script record (for seeds and tests): ``select`` goes in the upper five bits."""
    size = len(payload) if length is None else length
    return bytes([(select << 3 | kind) & 0xFF]) + struct.pack(">H", size) + payload


class Driver:
    """The engine and a driver that answers its actions the fixed way."""

    def __init__(self, config: EngineConfig = CONFIG) -> None:
        self.config = config
        self.engine = Engine(config, entropy=random.Random(0).randbytes)
        self.now = 1000.0
        self.wall = 1_780_000_000.0
        self.held: list[LookupAccount] = []
        self.lookups = 0
        self.allocations = 0
        self.nonces = NonceFactory(SECRET, lifetime=config.nonce_lifetime)
        self.salt = 0
        self.last_carrier_request: Request | None = None
        self.last_invite: tuple[Request, tuple[str, int], Transport, int | None] | None = None
        self.last_ok: tuple[Response, tuple[str, int]] | None = None
        self.open_connections: set[int] = set()
        self.sends = 0

    # ------------------------------------------------------------- the script

    def run(self, data: bytes, *, limit: int = 64) -> None:
        for count, (control, length, payload) in enumerate(records(data)):
            if count >= limit:
                break
            self.step(control, length, payload)
            self.check_bounds()
        self.drain()

    def step(self, control: int, length: int, payload: bytes) -> None:
        kind, select = control & 7, control >> 3
        source = SOURCES[select & 7]
        if kind == KIND_UDP:
            self.receive(payload, source, Transport.UDP, None)
        elif kind == KIND_TCP:
            connection = select % CONNECTIONS
            self.open_connections.add(connection)
            self.receive(payload, SOURCES[connection], Transport.TCP, connection)
        elif kind == KIND_TIME:
            self.advance(length / 100.0)
        elif kind == KIND_CLOSE:
            connection = select % CONNECTIONS
            self.open_connections.discard(connection)
            self.perform(self.engine.connection_closed(connection, now=self.now, wall=self.wall))
        elif kind == KIND_AUTH:
            self.authorized(payload, select)
        elif kind == KIND_CARRIER_ANSWER:
            self.carrier_answer(select)
        elif kind == KIND_CARRIER_RAW:
            self.receive(payload, CARRIER, Transport.UDP, None)
        else:
            self.follow_up(select)

    # ------------------------------------------------------------ the inputs

    def receive(
        self, data: bytes, source: tuple[str, int], transport: Transport, connection: int | None
    ) -> None:
        actions = self.engine.receive(
            data, source=source, transport=transport, now=self.now, wall=self.wall,
            connection=connection,
        )  # fmt: skip
        self.perform(actions)

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        for _ in range(10_000):
            deadline = self.engine.next_timer()
            if deadline is None or deadline > target:
                break
            self.wall += max(0.0, deadline - self.now)
            self.now = max(self.now, deadline)
            self.perform(self.engine.handle_timer(now=self.now, wall=self.wall))
        else:
            raise AssertionError("more than 10,000 timer firings in one clock step")
        self.wall += max(0.0, target - self.now)
        self.now = max(self.now, target)
        held, self.held = self.held, []
        for lookup in held:
            self.answer_lookup(lookup)

    def authorized(self, payload: bytes, select: int) -> None:
        """The payload, when it parses as a request, with valid credentials."""
        try:
            message = parse_message(payload)
        except ParseError:
            self.receive(payload, SOURCES[0], Transport.UDP, None)
            return
        if not isinstance(message, Request):
            self.receive(payload, SOURCES[0], Transport.UDP, None)
            return
        username = USERNAMES[select & 3]
        password = PASSWORD if not select & 4 else "wrong"
        self.salt += 1
        nonce = self.nonces.make(wall=self.wall, salt=self.salt.to_bytes(8, "big"))
        challenge = parse_challenge(make_challenge(realm=REALM, nonce=nonce))
        credentials = answer_challenge(
            challenge,
            username=username,
            ha1=compute_ha1(username, REALM, password),
            method=message.method,
            uri=message.uri,
            cnonce="0a4f113b",
        )
        message.headers.remove("Authorization")
        message.headers.add("Authorization", make_authorization(credentials))
        use_tcp = bool(select & 8)
        transport = Transport.TCP if use_tcp else Transport.UDP
        connection = 0 if use_tcp else None
        source = SOURCES[0] if not select & 16 else SOURCES[4]
        if use_tcp:
            source = SOURCES[0]
            self.open_connections.add(0)
        if message.method == "INVITE":
            self.last_invite = (message, source, transport, connection)
        self.receive(bytes(message), source, transport, connection)

    def carrier_answer(self, select: int) -> None:
        request = self.last_carrier_request
        if request is None:
            return
        if request.method != "INVITE":
            code = 200
        else:
            code = CARRIER_STATUSES[select % len(CARRIER_STATUSES)]
        body = CARRIER_SDP if request.method == "INVITE" and code in (183, 200) else b""
        headers = [("Contact", "<sip:gw@192.0.2.50:5060>")] if code != 100 else []
        if body:
            headers.append(("Content-Type", "application/sdp"))
        response = make_response(
            request, code, "Reason", to_tag=None if code == 100 else "carrier-tag",
            headers=headers, body=body,
        )  # fmt: skip
        self.receive(bytes(response), CARRIER, Transport.UDP, None)

    def follow_up(self, select: int) -> None:
        """ACK or BYE for the last 2xx sent to a client, or CANCEL/ACK for the last INVITE."""
        what = select & 3
        if what in (0, 1) and self.last_ok is not None:
            ok, destination = self.last_ok
            method = "ACK" if what == 0 else "BYE"
            cseq = ok.cseq.number if method == "ACK" else ok.cseq.number + 1
            contact = ok.headers.get("Contact") or f"<sip:{SERVER[0]}>"
            uri = contact.strip().lstrip("<").split(">", 1)[0]
            request = Request(
                method,
                uri,
                [
                    ("Via", f"SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKfu{self.salt}{what};rport"),
                    ("Max-Forwards", "70"),
                    ("From", ok.headers.get("From") or ""),
                    ("To", ok.headers.get("To") or ""),
                    ("Call-ID", ok.headers.get("Call-ID") or ""),
                    ("CSeq", f"{cseq} {method}"),
                ],
                b"",
            )
            self.salt += 1
            self.receive(bytes(request), destination, Transport.UDP, None)
            return
        if self.last_invite is None:
            return
        invite, source, transport, connection = self.last_invite
        method = "CANCEL" if what == 2 else "ACK"
        request = Request(
            method,
            invite.uri,
            [
                ("Via", invite.headers.get("Via") or ""),
                ("Max-Forwards", "70"),
                ("From", invite.headers.get("From") or ""),
                ("To", invite.headers.get("To") or ""),
                ("Call-ID", invite.headers.get("Call-ID") or ""),
                ("CSeq", f"{(invite.headers.get('CSeq') or '1').split()[0]} {method}"),
            ],
            b"",
        )
        if transport is Transport.TCP and connection not in self.open_connections:
            return
        self.receive(bytes(request), source, transport, connection)

    # ----------------------------------------------------------- the actions

    def perform(self, actions: Iterable[object]) -> None:
        queue = list(actions)
        steps = 0
        while queue:
            steps += 1
            assert steps < 10_000, "an input set off more than 10,000 actions"
            action = queue.pop(0)
            if isinstance(action, Send):
                self.sent(action)
            elif isinstance(action, LookupAccount):
                self.lookups += 1
                if self.lookups % 5 == 0:
                    self.held.append(action)  # answered at the next clock step
                else:
                    queue += self.lookup_result(action)
            elif isinstance(action, AllocateMedia):
                self.allocations += 1
                if self.allocations % 7 == 0:
                    queue += self.engine.media_failed(
                        action.token, "relay down", now=self.now, wall=self.wall
                    )
                else:
                    allocation = MediaAllocation(
                        call_ref=action.call_ref, a_address="203.0.113.9", a_port=20000,
                        b_address="203.0.113.9", b_port=20002,
                    )  # fmt: skip
                    queue += self.engine.media_allocated(
                        action.token, allocation, now=self.now, wall=self.wall
                    )
            elif isinstance(action, CallRecord):
                assert action.record.account in ACCOUNTS, action.record
            elif isinstance(action, CloseConnection):
                self.open_connections.discard(action.connection)
            else:
                assert isinstance(action, (Log, ReleaseMedia, UpdateMedia)), action

    def lookup_result(self, lookup: LookupAccount) -> list[object]:
        if self.lookups % 11 == 0:
            return list(self.engine.account_unavailable(lookup.token, now=self.now, wall=self.wall))
        account = ACCOUNTS.get(lookup.username)
        return list(self.engine.account_found(lookup.token, account, now=self.now, wall=self.wall))

    def answer_lookup(self, lookup: LookupAccount) -> None:
        self.perform(self.lookup_result(lookup))

    def sent(self, send: Send) -> None:
        self.sends += 1
        assert isinstance(send.data, bytes) and send.data, send
        if send.data == b"\r\n":
            return  # RFC 5626 keep-alive pong
        try:
            message = parse_message(send.data, max_size=1 << 20)
        except ParseError:
            # Only an error answer may fail to parse: it copies the malformed
            # request's From/To/Via verbatim (RFC 3261 §8.2.6.2). Its own
            # start line must still be a well-formed status line.
            status_line = send.data.split(b"\r\n", 1)[0]
            assert _ERROR_STATUS_LINE.fullmatch(status_line), send.data[:200]
            return
        if isinstance(message, Request):
            if send.destination == CARRIER:
                self.last_carrier_request = message
        elif message.status_code == 200 and message.cseq.method == "INVITE":
            self.last_ok = (message, send.destination)

    # ----------------------------------------------------------- the checks

    def check_bounds(self) -> None:
        stats = self.engine.stats()
        config = self.config
        # The transaction layer admits a few over the limit for the engine's own
        # client transactions (B-leg), which are bounded by the calls.
        assert stats["transactions"] <= config.max_transactions + 4 * config.max_calls, stats
        assert stats["calls_active"] <= config.max_calls, stats
        assert stats["pending_lookups"] <= config.max_pending_lookups, stats
        assert stats["guard_entries"] <= 3 * config.guard.capacity, stats
        assert len(self.engine._delayed) <= config.max_delayed_answers, stats
        assert len(self.engine._framers) <= CONNECTIONS, stats

    def drain(self) -> None:
        """Run the clock past every timer and call limit: nothing may remain."""
        self.advance(self.config.max_call_duration + self.config.ring_timeout + 120.0)
        self.advance(120.0)  # the BYE transactions of calls ended by the limit
        stats = self.engine.stats()
        assert stats["transactions"] == 0, stats
        assert stats["calls_active"] == 0, stats
        assert stats["pending_lookups"] == 0, stats


def one_input(data: bytes) -> None:
    """The invariant for one script; raises AssertionError or the escaping exception."""
    Driver().run(data)


# ------------------------------------------------------------------- seeds


def _messages() -> list[bytes]:
    files = sorted((TESTDATA / "rfc4475").glob("*.dat"))
    files += sorted((TESTDATA / "softphones").glob("*.sip"))
    return [path.read_bytes() for path in files]


def _request(
    method: str, uri: str, *, extra: tuple[tuple[str, str], ...] = (), body: bytes = b""
) -> bytes:
    headers = [
        ("Via", "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-seed-" + method.lower() + ";rport"),
        ("Max-Forwards", "70"),
        ("From", f"<sip:alice@{REALM}>;tag=seedtag"),
        ("To", f"<{uri}>" if method != "REGISTER" else f"<sip:alice@{REALM}>"),
        ("Call-ID", f"seed-{method.lower()}@10.0.0.7"),
        ("CSeq", f"1 {method}"),
        ("Contact", "<sip:alice@10.0.0.7:5060>"),
        ("User-Agent", "Linphone/5.2 (belle-sip)"),
        *extra,
    ]
    if body:
        headers.append(("Content-Type", "application/sdp"))
    return bytes(Request(method, uri, headers, body))


OFFER = (
    b"v=0\r\no=alice 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\n"
    b"m=audio 7078 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)


def seeds() -> list[bytes]:
    """Scripts built from the shared vectors and from whole call flows."""
    out: list[bytes] = []
    messages = _messages()
    for index, message in enumerate(messages):
        out.append(record(KIND_UDP, message, select=index & 7))
        out.append(record(KIND_TCP, message, select=index & 3) + record(KIND_TIME, length=3300))
        out.append(record(KIND_AUTH, message, select=index & 31))
    register = _request("REGISTER", f"sip:{REALM}", extra=(("Expires", "300"),))
    invite = _request("INVITE", f"sip:17752180264@{REALM}", body=OFFER)
    retry = register.replace(b"branch=z9hG4bK-seed-", b"branch=z9hG4bK-retry-")
    out.append(record(KIND_UDP, register) + record(KIND_AUTH, retry.replace(b"1 REG", b"2 REG")))
    answered_call = (
        record(KIND_AUTH, invite)
        + record(KIND_CARRIER_ANSWER, select=1)
        + record(KIND_CARRIER_ANSWER, select=3)
        + record(KIND_FOLLOW_UP, select=0)
        + record(KIND_TIME, length=3000)
        + record(KIND_FOLLOW_UP, select=1)
        + record(KIND_CARRIER_ANSWER, select=3)
    )
    out.append(answered_call)
    out.append(record(KIND_AUTH, invite) + record(KIND_FOLLOW_UP, select=2))
    out.append(record(KIND_AUTH, invite, select=2) + record(KIND_CARRIER_ANSWER, select=5))
    out.append(
        record(KIND_AUTH, invite, select=8) + record(KIND_CLOSE) + record(KIND_TIME, length=9000)
    )
    guesses = [
        register.replace(b"seed-register", b"guess-%d" % i).replace(b"1 REG", b"%d REG" % (i + 2))
        for i in range(12)
    ]
    out.append(
        b"".join(record(KIND_AUTH, g, select=4 | (i & 1) << 4) for i, g in enumerate(guesses))
    )
    stream = b"".join(messages[:3])
    out.append(
        b"".join(
            record(KIND_TCP, stream[i : i + 200], select=1) for i in range(0, len(stream), 200)
        )
    )
    return out


def write_seeds(directory: Path = SEEDS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for seed in seeds():
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return directory


def main() -> None:
    import atheris

    if not any(arg for arg in sys.argv[1:] if not arg.startswith("-")):
        sys.argv.append(str(write_seeds()))
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
