"""Bad input over real UDP and TCP to a running ``kx-sipd serve``, and what it answered.

Each case sends one kind of hostile or broken input and records the answer:
a status line (with the headers that make it actionable: Allow, Retry-After,
Unsupported, Accept, a stale challenge), "dropped" (nothing came back, while
an OPTIONS sent right after on the same socket was answered), or "connection
closed". Every answer must be a clear one (a status whose reason names the
fault, with what the client needs to recover) or a drop; the server answers
a valid OPTIONS after every case and stays up to the end, and its counters
show the drops were counted.

The table of docs/robustness.md between its ``bad-inputs`` markers is written
from this run: ``KX_REGEN_DOCS=1 python3 -m pytest tests/robustness/test_bad_inputs.py``
rewrites it; otherwise the test checks the file is current (like
tests/unit/test_cli_docs.py), so a change of behaviour shows up as a diff.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from robust_support import (
    REALM,
    KxServer,
    Raw,
    Response,
    authorization,
    make_database,
    nonce_of,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
LIMITS_BEGIN, LIMITS_END = "<!-- limits:begin -->", "<!-- limits:end -->"

# The server of this test: small enough limits that each can be shown.
SERVER_OPTIONS = (
    "--max-message-size", "8192", "--drop-scanners", "--tcp-idle-timeout", "3",
    "--max-tcp-per-ip", "4", "--ban-failures", "5", "--ban-time", "60",
)  # fmt: skip
IDLE = 3.0
AFTER_PROBE = 0.4  # an answer may trail the probe's (a look-up in a worker thread)

# Answers that are clear by themselves, and the header each must carry.
CLEAR = {400, 401, 403, 405, 413, 415, 416, 420, 481, 483, 488, 503, 505, 513}
REQUIRED_HEADER = {405: "Allow", 503: "Retry-After", 420: "Unsupported", 415: "Accept"}
SHOWN_HEADERS = ("Allow", "Retry-After", "Unsupported", "Accept")


@attrs.frozen
class Case:
    kind: str
    transport: str
    run: Callable[[Ctx], str]
    expect: str  # the start of the answer, e.g. "400", "dropped", "connection closed"


@attrs.define
class Ctx:
    server: KxServer
    next_ip: int = 20

    def source(self) -> str:
        """A fresh loopback source address (auth failures must not add up to a ban)."""
        self.next_ip += 1
        return f"127.0.0.{self.next_ip}"


CASES: list[Case] = []


def case(
    kind: str, transport: str, expect: str
) -> Callable[[Callable[[Ctx], str]], Callable[[Ctx], str]]:
    def register(function: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
        CASES.append(Case(kind, transport, function, expect))
        return function

    return register


# ---------------------------------------------------------------- observing


def describe(response: Response) -> str:
    text = f"{response.status} {response.reason}"
    extras = [f"{name}: {response.header(name)}" for name in SHOWN_HEADERS if response.header(name)]
    challenge = response.header("WWW-Authenticate") or ""
    if "stale=true" in challenge.replace(" ", "").lower():
        extras.append("stale=true")
    if extras:
        text += " (" + "; ".join(extras) + ")"
    return text


def observe_udp(
    server: KxServer,
    data: bytes | list[bytes],
    *,
    source: str = "127.0.0.1",
    raw: Raw | None = None,
) -> str:
    """Send, then an OPTIONS probe on the same socket; the first final answer
    that is not the probe's is the answer, else "dropped"."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    target = ("::1", server.port) if family == socket.AF_INET6 else server.address
    own = raw is None
    raw = raw or Raw(target, bind=source, family=family)
    try:
        for chunk in data if isinstance(data, list) else [data]:
            raw.send(chunk)
        probe = raw.request("OPTIONS")
        probe_id = raw.call_id
        raw.send(probe)
        return _answer_or_drop(raw, probe_id)
    finally:
        if own:
            raw.close()


def _answer_or_drop(raw: Raw, probe_id: str) -> str:
    deadline = time.monotonic() + 8.0
    probe_answered_at: float | None = None
    provisional: Response | None = None
    while time.monotonic() < deadline:
        wait = deadline - time.monotonic()
        if probe_answered_at is not None:
            wait = min(wait, probe_answered_at + AFTER_PROBE - time.monotonic())
            if wait <= 0:
                break
        response = raw.receive(wait)
        if response is None:
            if raw.closed:
                return "connection closed"
            continue
        if response.header("Call-ID") == probe_id:
            if response.status >= 200:
                probe_answered_at = time.monotonic()
            continue
        if response.status >= 200:
            return describe(response)
        provisional = response
    if probe_answered_at is None:
        raise AssertionError("neither the input nor the OPTIONS probe was answered")
    if provisional is not None:
        return f"{describe(provisional)}, then handed to the carrier"
    return "dropped"


def observe_tcp(server: KxServer, data: bytes | list[bytes], *, source: str = "127.0.0.1") -> str:
    """Over one TCP connection: the answer, "connection closed", or (when the
    server waits for more bytes) what the idle timeout does."""
    with Raw(server.address, transport="tcp", bind=source) as raw:
        try:
            for chunk in data if isinstance(data, list) else [data]:
                raw.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return "connection closed"
        response = raw.final(timeout=1.5)
        if response is not None:
            if response.status >= 400 and raw.final(timeout=0.5) is None and raw.closed:
                # A framing fault: answered, then the stream cannot be resynchronised.
                return f"{describe(response)}, then connection closed"
            return describe(response)
        if raw.closed:
            return "connection closed"
        # Nothing yet: the server is waiting for the rest of a message. It
        # must give up at the idle timeout.
        response = raw.final(timeout=IDLE + 4.0)
        if response is not None:
            return describe(response)
        if raw.closed:
            return f"connection closed at the idle timeout ({IDLE:g} s)"
        return "no answer, connection left open"


def msg(
    start: str = f"OPTIONS sip:{REALM} SIP/2.0",
    *,
    drop: tuple[str, ...] = (),
    replace: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    body: bytes = b"",
    content_length: str | None = None,
    transport: str = "UDP",
) -> bytes:
    """A request line and headers, with some removed, replaced or added."""
    call_id = f"{random.getrandbits(64):016x}@bad"
    branch = f"z9hG4bK{random.getrandbits(48):012x}"
    method = start.split(" ", 1)[0]
    headers = {
        "Via": f"SIP/2.0/{transport} 127.0.0.1:5999;branch={branch};rport",
        "Max-Forwards": "70",
        "From": f"<sip:alice@{REALM}>;tag=bad1",
        "To": f"<sip:alice@{REALM}>",
        "Call-ID": call_id,
        "CSeq": f"1 {method}",
    }
    headers.update(replace or {})
    lines = [start, *(f"{k}: {v}" for k, v in headers.items() if k not in drop), *extra]
    length = str(len(body)) if content_length is None else content_length
    if "Content-Length" not in drop:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def authed(
    ctx: Ctx, source: str, method: str, uri: str, *, user: str = "alice",
    password: str = "alice-secret", body: bytes = b"", headers: tuple[tuple[str, str], ...] = (),
) -> tuple[Raw, bytes]:  # fmt: skip
    """A socket bound to ``source`` and the request it would send after a 401."""
    raw = Raw(ctx.server.address, bind=source)
    content = (("Content-Type", "application/sdp"),) if body else ()
    raw.send(raw.request(method, uri, user=user, body=body, headers=(*headers, *content)))
    first = raw.final()
    assert first is not None and first.status == 401, first
    auth = authorization(user, password, method, uri, nonce_of(first))
    request = raw.request(
        method, uri, user=user, body=body, new_call=False,
        headers=(*headers, *content, ("Authorization", auth)),
    )  # fmt: skip
    return raw, request


def sdp(formats: str, rtpmaps: str = "", *, connection: str = "c=IN IP4 127.0.0.1") -> bytes:
    text = (
        f"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\n{connection}\r\nt=0 0\r\n"
        f"m=audio 40000 RTP/AVP {formats}\r\n{rtpmaps}"
    )
    return text.encode()


DIAL = f"sip:17752180264@{REALM}"

# ------------------------------------------------------------ the cases: UDP


@case("empty datagram", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, b"")


@case("CRLF keep-alive (RFC 5626)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, b"\r\n\r\n")


@case("random binary garbage (1 KiB)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, random.Random(7).randbytes(1024))


@case("request truncated inside the request line", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, b"INVITE sip:1775")


@case("request truncated inside the headers (no blank line)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg()[:120])


@case("SIP/3.0 request line", "udp", "505")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"OPTIONS sip:{REALM} SIP/3.0"))


@case("request line with extra spaces", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"OPTIONS  sip:{REALM}  SIP/2.0"))


@case("unknown method FOOBAR", "udp", "405")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"FOOBAR sip:{REALM} SIP/2.0"))


@case("MESSAGE (a real method kx-sipd does not take)", "udp", "405")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"MESSAGE sip:{REALM} SIP/2.0"))


@case("no Call-ID", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(drop=("Call-ID",)))


@case("no CSeq", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(drop=("CSeq",)))


@case("CSeq method differs from the request's", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(replace={"CSeq": "1 INVITE"}))


@case("CSeq number not a number", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(replace={"CSeq": "one OPTIONS"}))


@case("CSeq number above 2**31", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(replace={"CSeq": "99999999999 OPTIONS"}))


@case("no From", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(drop=("From",)))


@case("no To", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(drop=("To",)))


@case("no Via (nowhere to answer)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(drop=("Via",)))


@case("Via with a port above 65535", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(
        ctx.server, msg(replace={"Via": "SIP/2.0/UDP 127.0.0.1:99999;branch=z9hG4bKport"})
    )


@case("OPTIONS with Max-Forwards not a number (not needed to answer it)", "udp", "200")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(replace={"Max-Forwards": "seventy"}))


@case("INVITE with Max-Forwards not a number", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(
        ctx.server, msg(f"INVITE {DIAL} SIP/2.0", replace={"Max-Forwards": "seventy"})
    )


@case("INVITE with Max-Forwards: 0", "udp", "483")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"INVITE {DIAL} SIP/2.0", replace={"Max-Forwards": "0"}))


@case("Request-URI with an http: scheme", "udp", "416")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg("OPTIONS http://example.com/ SIP/2.0"))


@case("Request-URI in angle brackets", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"OPTIONS <sip:{REALM}> SIP/2.0"))


@case("Require: an extension kx-sipd does not support", "udp", "420")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("Require: 100rel, foo",)))


@case("INVITE with a text/plain body", "udp", "415")
def _(ctx: Ctx) -> str:
    return observe_udp(
        ctx.server,
        msg(f"INVITE {DIAL} SIP/2.0", extra=("Content-Type: text/plain",), body=b"hello"),
    )


@case("Content-Length larger than the datagram's body", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(body=b"abc", content_length="300"))


@case("Content-Length: 99999999999999999999", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(content_length="99999999999999999999"))


@case("negative Content-Length", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(content_length="-5"))


@case("two different Content-Length headers", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("Content-Length: 7",)))


@case("datagram of 9,000 bytes (over --max-message-size 8192)", "udp", "513")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("X-Pad: " + "a" * 9000,)))


@case("datagram of 65,507 bytes (the largest IPv4 UDP payload)", "udp", "513")
def _(ctx: Ctx) -> str:
    head = msg(extra=("X-Pad: ",))
    pad = 65507 - len(head)
    return observe_udp(ctx.server, msg(extra=("X-Pad: " + "a" * pad,)))


@case("NUL byte inside an unknown header's value (kept verbatim)", "udp", "200")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("Subject: a\x00b",)))


@case("invalid UTF-8 in a header value", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("Subject: \udcff\udcfe",)))


@case("bare LF line ends", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("Subject: a\nX-B: c",)))


@case("header line without a colon", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("this is not a header",)))


@case("300 header fields (over --max-headers 256)", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=tuple(f"X-H{i}: {i}" for i in range(300))))


@case("3,000 header fields (over the size limit first)", "udp", "513")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=tuple(f"X:{i}" for i in range(3000))))


@case("100 Via headers (over --max-via-depth 64)", "udp", "400")
def _(ctx: Ctx) -> str:
    vias = tuple(f"Via: SIP/2.0/UDP 10.0.0.{i % 250}:5060;branch=z9hG4bKv{i}" for i in range(99))
    return observe_udp(ctx.server, msg(extra=vias))


@case("Call-ID of 6,000 characters", "udp", "200")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(replace={"Call-ID": "c" * 6000}))


@case("From with an unterminated quoted display name", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(replace={"From": '"Alice <sip:alice@x>;tag=1'}))


@case("REGISTER whose To is a tel: URI", "udp", "400")
def _(ctx: Ctx) -> str:
    return observe_udp(
        ctx.server, msg(f"REGISTER sip:{REALM} SIP/2.0", replace={"To": "<tel:+15551234>"})
    )


@case("stray response (SIP/2.0 200 OK to nothing)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    response = msg("SIP/2.0 200 OK").replace(b"CSeq: 1 SIP/2.0", b"CSeq: 1 INVITE")
    return observe_udp(ctx.server, response)


@case("stray ACK (no transaction, no call)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"ACK {DIAL} SIP/2.0", replace={"To": f"<{DIAL}>;tag=x"}))


@case("CANCEL matching no INVITE", "udp", "481")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"CANCEL {DIAL} SIP/2.0"))


@case("BYE outside any dialog (no To tag)", "udp", "481")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(f"BYE {DIAL} SIP/2.0"))


@case("BYE for an unknown dialog", "udp", "481")
def _(ctx: Ctx) -> str:
    return observe_udp(
        ctx.server, msg(f"BYE {DIAL} SIP/2.0", replace={"To": f"<{DIAL}>;tag=nosuchdialog"})
    )


@case("Authorization that is not Digest syntax", "udp", "400")
def _(ctx: Ctx) -> str:
    request = msg(f"REGISTER sip:{REALM} SIP/2.0", extra=('Authorization: Digest ,,,="',))
    return observe_udp(ctx.server, request, source=ctx.source())


@case("Authorization with a forged nonce", "udp", "401")
def _(ctx: Ctx) -> str:
    uri = f"sip:{REALM}"
    forged = authorization("alice", "alice-secret", "REGISTER", uri, "AAAAforgedBBBB")
    request = msg(f"REGISTER {uri} SIP/2.0", extra=(f"Authorization: {forged}",))
    return observe_udp(ctx.server, request, source=ctx.source())


@case("Authorization with an unsupported algorithm", "udp", "40")
def _(ctx: Ctx) -> str:
    source = ctx.source()
    raw, request = authed(ctx, source, "REGISTER", f"sip:{REALM}")
    with raw:
        return observe_udp(
            ctx.server, request.replace(b"algorithm=MD5", b"algorithm=SHA-999"), raw=raw
        )


@case("REGISTER for an unknown user", "udp", "403")
def _(ctx: Ctx) -> str:
    raw, request = authed(ctx, ctx.source(), "REGISTER", f"sip:{REALM}", user="mallory")
    with raw:
        return observe_udp(ctx.server, request, raw=raw)


@case("REGISTER with a wrong password", "udp", "403")
def _(ctx: Ctx) -> str:
    raw, request = authed(ctx, ctx.source(), "REGISTER", f"sip:{REALM}", password="guess")
    with raw:
        return observe_udp(ctx.server, request, raw=raw)


@case("REGISTER for a suspended account", "udp", "403")
def _(ctx: Ctx) -> str:
    source = ctx.source()
    raw, request = authed(
        ctx, source, "REGISTER", f"sip:{REALM}", user="bob", password="bob-secret"
    )
    with raw:
        return observe_udp(ctx.server, request, raw=raw)


@case("REGISTER with Contact: * and Expires: 300", "udp", "400")
def _(ctx: Ctx) -> str:
    raw, request = authed(ctx, ctx.source(), "REGISTER", f"sip:{REALM}")
    request = re.sub(rb"Contact: [^\r]*", b"Contact: *", request)
    request = request.replace(b"Content-Length", b"Expires: 300\r\nContent-Length")
    with raw:
        return observe_udp(ctx.server, request, raw=raw)


@case("INVITE whose nonce was already used by another INVITE", "udp", "401")
def _(ctx: Ctx) -> str:
    raw, request = authed(
        ctx, ctx.source(), "INVITE", DIAL, body=sdp("18", "a=rtpmap:18 G729/8000\r\n")
    )
    with raw:
        raw.send(request)
        raw.final()  # 488: the nonce is now spent
        again = re.sub(rb"branch=z9hG4bK[0-9a-f]+", b"branch=z9hG4bKreplay1", request)
        again = again.replace(b"CSeq: 2 INVITE", b"CSeq: 3 INVITE")
        return observe_udp(ctx.server, again, raw=raw)


@case("INVITE offering only G.729 (no G.711)", "udp", "488")
def _(ctx: Ctx) -> str:
    raw, request = authed(
        ctx, ctx.source(), "INVITE", DIAL, body=sdp("18", "a=rtpmap:18 G729/8000\r\n")
    )
    with raw:
        return observe_udp(ctx.server, request, raw=raw)


@case("INVITE with a malformed SDP body", "udp", "4")
def _(ctx: Ctx) -> str:
    raw, request = authed(ctx, ctx.source(), "INVITE", DIAL, body=b"v=0\r\nthis is not sdp\r\n")
    with raw:
        return observe_udp(ctx.server, request, raw=raw)


@case("INVITE whose SDP has no connection address", "udp", "100")
def _(ctx: Ctx) -> str:
    raw, request = authed(ctx, ctx.source(), "INVITE", DIAL, body=sdp("0", connection="b=AS:64"))
    with raw:
        return observe_udp(ctx.server, request, raw=raw)


@case("OPTIONS from a scanner User-Agent (friendly-scanner), --drop-scanners", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, msg(extra=("User-Agent: friendly-scanner",)))


@case("6th failed login from one IP within --ban-window (--ban-failures 5)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    source = ctx.source()
    for attempt in range(5):
        raw, request = authed(ctx, source, "REGISTER", f"sip:{REALM}", user=f"probe{attempt}")
        with raw:
            raw.send(request)
            answer = raw.final()
            assert answer is not None and answer.status == 403, answer
    # The source is banned, so a probe from it would be dropped too: wait instead.
    with Raw(ctx.server.address, bind=source) as raw:
        raw.send(msg())
        answer = raw.final(timeout=1.5)
        return "dropped" if answer is None else describe(answer)


@case("garbage from an IPv6 source (::1)", "udp", "dropped")
def _(ctx: Ctx) -> str:
    return observe_udp(ctx.server, b"\xff\xfe" * 100, source="::1")


@case("no Call-ID, from an IPv6 source (::1)", "udp", "400")
def _(ctx: Ctx) -> str:
    request = msg(drop=("Call-ID",), replace={"Via": "SIP/2.0/UDP [::1]:5999;branch=z9hG4bKv6"})
    return observe_udp(ctx.server, request, source="::1")


# ------------------------------------------------------------ the cases: TCP


@case("random binary garbage", "tcp", "connection closed")
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, random.Random(8).randbytes(2048))


@case(
    "no Content-Length (mandatory on TCP)",
    "tcp",
    "400 Missing Content-Length, then connection closed",
)
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, msg(drop=("Content-Length",), transport="TCP"))


@case("Content-Length: 1,000,000,000", "tcp", "513 Message Too Large: body, then connection closed")
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, msg(content_length="1000000000", transport="TCP"))


@case("Content-Length larger than what is sent, then silence", "tcp", "connection closed")
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, msg(content_length="100", body=b"abc", transport="TCP"))


@case(
    "header section of 80 KiB without an end",
    "tcp",
    "513 Message Too Large: header block, then connection closed",
)
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, msg()[:100] + b"X-Pad: " + b"a" * 80_000)


@case(
    "message of 9,000 bytes (over --max-message-size 8192)",
    "tcp",
    "513 Message Too Large: header block, then connection closed",
)
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, msg(extra=("X-Pad: " + "a" * 9000,), transport="TCP"))


@case("slowloris: half a request, then silence", "tcp", "connection closed")
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, msg(transport="TCP")[:60])


@case("a valid OPTIONS sent one byte per segment", "tcp", "200")
def _(ctx: Ctx) -> str:
    data = msg(transport="TCP")
    return observe_tcp(ctx.server, [data[i : i + 1] for i in range(len(data))])


@case("NUL bytes between pipelined requests", "tcp", "200")
def _(ctx: Ctx) -> str:
    return observe_tcp(ctx.server, msg(transport="TCP") + b"\x00\x00\x00" + msg(transport="TCP"))


@case("5th TCP connection from one IP (--max-tcp-per-ip 4)", "tcp", "connection closed")
def _(ctx: Ctx) -> str:
    source = ctx.source()
    held = [Raw(ctx.server.address, transport="tcp", bind=source) for _ in range(4)]
    try:
        for raw in held:  # each one really is open and served
            raw.send(raw.request("OPTIONS"))
            answer = raw.final()
            assert answer is not None and answer.status == 200, answer
        return observe_tcp(ctx.server, msg(transport="TCP"), source=source)
    finally:
        for raw in held:
            raw.close()


# ------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KxServer]:
    directory = tmp_path_factory.mktemp("bad-inputs")
    # Calls are routed to a carrier that never answers: every INVITE case is
    # decided before the carrier is asked.
    db = make_database(directory / "kx.sqlite", carrier=("127.0.0.1", 9))
    running = KxServer.start(directory, *SERVER_OPTIONS, db=db)
    try:
        yield running
    finally:
        running.stop()


def test_every_bad_input_gets_a_clear_answer_or_a_counted_drop(server: KxServer) -> None:
    assert len(CASES) >= 40
    random.seed(4475)
    ctx = Ctx(server)
    rows = []
    problems = []
    for item in CASES:
        answer = item.run(ctx)
        rows.append((item, answer))
        if not answer.startswith(item.expect):
            problems.append(f"{item.kind} ({item.transport}): {answer!r}, expected {item.expect}")
        problem = unclear(answer)
        if problem:
            problems.append(f"{item.kind} ({item.transport}): {problem}")
        assert server.alive, server.log_tail()
        assert server.answers_options(), f"no OPTIONS answer after {item.kind}"
    stats = _stop_and_count(server)
    assert stats.get("dropped_malformed", 0) > 0 and stats.get("dropped_banned", 0) > 0, stats
    assert stats.get("dropped_scanner", 0) > 0 and stats.get("keepalives", 0) > 0, stats
    assert stats.get("framing_errors", 0) > 0, stats
    _write_or_check_table(rows)
    assert not problems, "\n".join(problems)


def unclear(answer: str) -> str | None:
    """Why ``answer`` is not a clear answer, or None."""
    if answer.startswith(("dropped", "connection closed")):
        return None
    match = re.match(r"(\d{3}) ([^(]*)", answer)
    if match is None:
        return f"not an answer: {answer!r}"
    code, reason = int(match.group(1)), match.group(2).strip()
    if code < 300:
        return None  # an edge case that is fine to accept
    if code not in CLEAR:
        return f"{code} is not one of the clear answers"
    if code == 400 and reason.lower() in ("bad request", ""):
        return "400 without a reason naming the fault"
    header = REQUIRED_HEADER.get(code)
    if header is not None and f"{header}:" not in answer:
        return f"{code} without {header}"
    return None


def _stop_and_count(server: KxServer) -> dict[str, int]:
    assert server.stop() == 0, server.log_tail()
    return server.exit_stats()


def render_table(rows: list[tuple[Case, str]]) -> str:
    lines = ["| # | Transport | Input | Answer |", "|---|---|---|---|"]
    for number, (item, answer) in enumerate(rows, 1):
        cell = answer.replace("|", "\\|")
        lines.append(f"| {number} | {item.transport.upper()} | {item.kind} | {cell} |")
    options = " ".join(SERVER_OPTIONS)
    return (
        f"Server: `kx-sipd serve {options}` (anyio driver), every other setting at its "
        f"default. {len(rows)} kinds of input.\n\n" + "\n".join(lines)
    )


def render_limits() -> str:
    """The limit and guard settings with their defaults, from ServerSettings."""
    import attrs as _attrs

    from kx_sipd.settings import ServerSettings

    names = (
        "max_message_size", "max_headers", "max_via_depth", "max_transactions",
        "max_pending_lookups", "max_calls", "retry_after", "max_tcp_connections",
        "max_tcp_per_ip", "tcp_idle_timeout", "store_timeout", "ban_failures", "ban_window",
        "ban_time", "slow_after", "drop_scanners", "uniform_auth_failures",
    )  # fmt: skip
    fields = _attrs.fields_dict(ServerSettings)
    lines = ["| Option (TOML key) | Default | What happens |", "|---|---|---|"]
    for name in names:
        field = fields[name]
        default = field.default
        shown = (
            "off"
            if default is False
            else f"{default:,}"
            if isinstance(default, int)
            else f"{default:g}"
        )
        doc = str(field.metadata["doc"]).replace("|", "\\|")
        lines.append(
            f"| `--{name.replace('_', '-')}` (`{name.replace('_', '-')}`) | {shown} | {doc} |"
        )
    return "\n".join(lines)


def replace_section(text: str, begin: str, end: str, body: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + "\n" + text[stop:]


def _write_or_check_table(rows: list[tuple[Case, str]]) -> None:
    current = DOC.read_text(encoding="utf-8")
    wanted = replace_section(current, BEGIN, END, render_table(rows))
    wanted = replace_section(wanted, LIMITS_BEGIN, LIMITS_END, render_limits())
    if os.environ.get("KX_REGEN_DOCS") == "1":
        DOC.write_text(wanted, encoding="utf-8")
        current = wanted
    assert current == wanted, (
        "docs/robustness.md is stale: run KX_REGEN_DOCS=1 python3 -m pytest "
        "tests/robustness/test_bad_inputs.py"
    )
