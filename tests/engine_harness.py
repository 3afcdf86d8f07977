"""A virtual-clock harness around the pure engine (STYLE §9: no sockets, no
sleeps, no mocks of the engine itself). The account store and the relay are
plain in-memory doubles that answer the engine's actions the way the drivers
do; a ``Phone`` and a ``Carrier`` build the SIP a real client and trunk send."""

from __future__ import annotations

import random
from collections.abc import Iterable

import attrs

from sansio_sip._actions import (
    AllocateMedia,
    CallRecord,
    Log,
    LookupAccount,
    ReleaseMedia,
    Send,
    UpdateMedia,
)
from sansio_sip._config import EngineConfig
from sansio_sip._digest import answer_challenge, compute_ha1, make_authorization, parse_challenge
from sansio_sip._engine import Engine
from sansio_sip._message import Request, Response, parse_message
from sansio_sip._model import Account, MediaAllocation, Route, Transport

REALM = "sip.kx21.com"
SERVER = ("203.0.113.1", 5060)
CLIENT = ("198.51.100.7", 40000)
CARRIER = ("192.0.2.50", 5060)

OFFER = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 10.0.0.7\r\n"
    b"s=-\r\n"
    b"c=IN IP4 10.0.0.7\r\n"
    b"t=0 0\r\n"
    b"m=audio 7078 RTP/AVP 96 0 8 101\r\n"
    b"a=rtpmap:96 opus/48000/2\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
    b"a=sendrecv\r\n"
)

ANSWER = (
    b"v=0\r\n"
    b"o=carrier 1 1 IN IP4 192.0.2.60\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.60\r\n"
    b"t=0 0\r\n"
    b"m=audio 30000 RTP/AVP 8 101\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=sendrecv\r\n"
)


def account(username: str = "acme", password: str = "s3cret", **overrides: object) -> Account:
    fields: dict[str, object] = {
        "username": username,
        "ha1": {
            "MD5": compute_ha1(username, REALM, password),
            "SHA-256": compute_ha1(username, REALM, password, "SHA-256"),
        },
        "route": Route(name="carrier", host=CARRIER[0], port=CARRIER[1]),
    }
    fields.update(overrides)
    return Account(**fields)  # type: ignore[arg-type]


@attrs.define
class Harness:
    engine: Engine
    accounts: dict[str, Account]
    now: float = 1000.0
    wall: float = 1_780_000_000.0
    store_up: bool = True
    relay_up: bool = True
    auto: bool = True
    sent: list[Send] = attrs.field(factory=list)
    records: dict[str, object] = attrs.field(factory=dict)
    record_log: list[object] = attrs.field(factory=list)
    media: dict[str, MediaAllocation] = attrs.field(factory=dict)
    released: list[str] = attrs.field(factory=list)
    updates: list[UpdateMedia] = attrs.field(factory=list)
    logs: list[Log] = attrs.field(factory=list)
    pending: list[object] = attrs.field(factory=list)
    next_port: int = 20000

    @classmethod
    def make(cls, *accounts: Account, seed: int = 7, **config: object) -> Harness:
        rng = random.Random(seed)
        engine = Engine(
            EngineConfig(nonce_secret=b"k" * 32, sip_address=SERVER, realm=REALM, **config),  # type: ignore[arg-type]
            entropy=rng.randbytes,
        )
        return cls(engine=engine, accounts={a.username: a for a in accounts})

    # --- feeding the engine
    def receive(
        self,
        data: bytes | Request | Response,
        source: tuple[str, int] = CLIENT,
        transport: Transport = Transport.UDP,
        connection: int | None = None,
    ) -> list[Send]:
        raw = data if isinstance(data, bytes) else bytes(data)
        actions = self.engine.receive(
            raw, source=source, transport=transport, now=self.now, wall=self.wall,
            connection=connection,
        )
        return self.perform(actions)

    def advance(self, seconds: float) -> list[Send]:
        """Move the virtual clock, firing every timer that falls due on the way."""
        target = self.now + seconds
        sends: list[Send] = []
        while True:
            deadline = self.engine.next_timer()
            if deadline is None or deadline > target:
                break
            self.wall += max(0.0, deadline - self.now)
            self.now = max(self.now, deadline)
            sends += self.perform(self.engine.handle_timer(now=self.now, wall=self.wall))
        self.wall += target - self.now
        self.now = target
        return sends

    def perform(self, actions: Iterable[object]) -> list[Send]:
        sends: list[Send] = []
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Send):
                sends.append(action)
                self.sent.append(action)
            elif isinstance(action, LookupAccount):
                if not self.auto:
                    self.pending.append(action)
                elif self.store_up:
                    queue += self.engine.account_found(
                        action.token, self.accounts.get(action.username), now=self.now,
                        wall=self.wall,
                    )
                else:
                    queue += self.engine.account_unavailable(
                        action.token, now=self.now, wall=self.wall
                    )
            elif isinstance(action, AllocateMedia):
                if not self.auto:
                    self.pending.append(action)
                elif self.relay_up:
                    allocation = MediaAllocation(
                        call_ref=action.call_ref, a_address="203.0.113.9", a_port=self.next_port,
                        b_address="203.0.113.9", b_port=self.next_port + 2,
                    )
                    self.next_port += 4
                    self.media[action.call_ref] = allocation
                    queue += self.engine.media_allocated(
                        action.token, allocation, now=self.now, wall=self.wall
                    )
                else:
                    queue += self.engine.media_failed(
                        action.token, "relay down", now=self.now, wall=self.wall
                    )
            elif isinstance(action, CallRecord):
                self.records[action.record.call_ref] = action.record
                self.record_log.append(action.record)
                # The record must be durable before what follows: note the
                # position so tests can check the order.
                self.sent.append(Send(data=b"#record " + action.record.call_ref.encode(),
                                      destination=("0.0.0.0", 9), transport=Transport.UDP))
            elif isinstance(action, ReleaseMedia):
                self.released.append(action.call_ref)
            elif isinstance(action, UpdateMedia):
                self.updates.append(action)
            elif isinstance(action, Log):
                self.logs.append(action)
        return sends


def parsed(sends: Iterable[Send]) -> list[Request | Response]:
    return [parse_message(s.data) for s in sends if not s.data.startswith(b"#record")]


def statuses(sends: Iterable[Send]) -> list[int]:
    return [m.status_code for m in parsed(sends) if isinstance(m, Response)]


@attrs.define
class Phone:
    """Builds what a softphone sends (Linphone-like)."""

    username: str = "acme"
    password: str = "s3cret"
    address: tuple[str, int] = CLIENT
    call_id: str = "c1d2e3f4@10.0.0.7"
    from_tag: str = "ftag1"
    cseq: int = 1
    branch_seq: int = 0
    transport: str = "UDP"

    def branch(self) -> str:
        self.branch_seq += 1
        safe = "".join(c for c in self.call_id if c.isalnum())[:8]
        return f"z9hG4bK-{safe}-{self.branch_seq}"

    def request(
        self,
        method: str,
        uri: str = f"sip:{REALM}",
        *,
        body: bytes = b"",
        extra: Iterable[tuple[str, str]] = (),
        to_tag: str | None = None,
        cseq: int | None = None,
        branch: str | None = None,
        to: str | None = None,
    ) -> Request:
        to_value = to or f"<sip:{self.username}@{REALM}>"
        if method != "REGISTER" and to is None:
            to_value = f"<{uri}>"
        if to_tag:
            to_value += f";tag={to_tag}"
        headers = [
            ("Via", f"SIP/2.0/{self.transport} 10.0.0.7:5060;branch={branch or self.branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.username}@{REALM}>;tag={self.from_tag}"),
            ("To", to_value),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq if cseq is not None else self.cseq} {method}"),
            ("Contact", f"<sip:{self.username}@10.0.0.7:5060;transport={self.transport.lower()}>"),
            ("User-Agent", "Linphone/5.2 (belle-sip)"),
            *extra,
        ]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return Request(method, uri, headers, body)

    def authorize(self, request: Request, challenge_response: Response,
                  *, password: str | None = None, nc: int = 1) -> Request:
        challenge = parse_challenge(challenge_response.headers.get("WWW-Authenticate") or "")
        credentials = answer_challenge(
            challenge,
            username=self.username,
            ha1=compute_ha1(self.username, challenge.realm, password or self.password),
            method=request.method,
            uri=request.uri,
            cnonce="0a4f113b",
            nc=nc,
            body=request.body,
        )
        request.headers.add("Authorization", make_authorization(credentials))
        return request


def ack_for_failure(request: Request, response: Response) -> Request:
    """The client's ACK for a non-2xx final response: same branch (§17.1.1.3)."""
    headers = [
        ("Via", request.headers.get("Via") or ""),
        ("Max-Forwards", "70"),
        ("From", request.headers.get("From") or ""),
        ("To", response.headers.get("To") or ""),
        ("Call-ID", request.call_id),
        ("CSeq", f"{request.cseq.number} ACK"),
    ]
    return Request("ACK", request.uri, headers)

def answer(request: Request, code: int, reason: str, *, to_tag: str = "carrier-tag",
           body: bytes = b"", contact: str = "<sip:gw@192.0.2.50:5060>") -> Response:
    """The carrier's (or a phone's) response to ``request``."""
    from sansio_sip._message import make_response

    headers: list[tuple[str, str]] = []
    if code != 100:
        headers.append(("Contact", contact))
    if body:
        headers.append(("Content-Type", "application/sdp"))
    return make_response(
        request, code, reason, to_tag=to_tag if code != 100 else None, headers=headers, body=body
    )


def requests_to(sends: Iterable[Send], destination: tuple[str, int]) -> list[Request]:
    return [
        m
        for s in sends
        if s.destination == destination and not s.data.startswith(b"#record")
        for m in [parse_message(s.data)]
        if isinstance(m, Request)
    ]


def responses_to(sends: Iterable[Send], destination: tuple[str, int]) -> list[Response]:
    return [
        m
        for s in sends
        if s.destination == destination and not s.data.startswith(b"#record")
        for m in [parse_message(s.data)]
        if isinstance(m, Response)
    ]
