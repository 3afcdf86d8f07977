"""The examples in examples/ run here, so they cannot rot: the asyncio
registrar is started as a script on a free loopback port and spoken to over
UDP; the digest filter's functions are called on built requests, and the filter
is started as a script in front of a UDP service and spoken to over UDP."""

from __future__ import annotations

import ast
import importlib.util
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import sansio_sip as sip

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

OFFER = (
    b"v=0\r\n"
    b"o=alice 1 1 IN IP4 127.0.0.1\r\n"
    b"s=-\r\n"
    b"c=IN IP4 127.0.0.1\r\n"
    b"t=0 0\r\n"
    b"m=audio 7078 RTP/AVP 96 0 8 101\r\n"
    b"a=rtpmap:96 opus/48000/2\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
)
OPUS_ONLY = OFFER.replace(b"RTP/AVP 96 0 8 101", b"RTP/AVP 96")


def request(
    method: str,
    uri: str,
    *,
    user: str = "alice",
    host: str = "example.test",
    branch: str = "z9hG4bK-1",
    cseq: int = 1,
    call_id: str = "example-call-1",
    authorization: str | None = None,
    body: bytes = b"",
    via: str = "127.0.0.1:5099",
    extra: tuple[str, ...] = (),
) -> bytes:
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {via};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{host}>;tag=from-1",
        f"To: <sip:{user}@{host}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:{user}@{via}>",
        *extra,
    ]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def authorize(
    challenge_response: bytes, method: str, uri: str, user: str, realm: str, password: str
) -> str:
    """The Authorization value answering the 401 in ``challenge_response``."""
    response = sip.parse_message(challenge_response)
    assert isinstance(response, sip.Response)
    header = response.headers.get("WWW-Authenticate")
    assert header is not None
    challenge = sip.parse_challenge(header)
    credentials = sip.answer_challenge(
        challenge,
        username=user,
        ha1=sip.compute_ha1(user, realm, password),
        method=method,
        uri=uri,
        cnonce="0a4f113b",
    )
    return sip.make_authorization(credentials)


# -- (a) examples/asyncio_registrar.py -------------------------------------------


@pytest.fixture(scope="module")
def registrar() -> Iterator[tuple[str, int]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "asyncio_registrar.py"), "127.0.0.1", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=15):
                pytest.fail("the registrar example did not start within 15 s")
        line = process.stdout.readline().decode()
        assert line.startswith("listening on "), line or process.stderr.read()  # type: ignore[union-attr]
        host, port = line.split()[-1].rsplit(":", 1)
        yield host, int(port)
    finally:
        process.kill()
        process.wait(timeout=10)


def exchange(server: tuple[str, int], data: bytes) -> sip.Response:
    """Send one request, return the first final response (1xx are skipped)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        client.sendto(data, server)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answer = sip.parse_message(client.recv(65535))
            assert isinstance(answer, sip.Response)
            if answer.status_code >= 200:
                return answer
    pytest.fail("no final response within 5 s")


def test_the_registrar_example_is_under_60_lines() -> None:
    assert len((EXAMPLES / "asyncio_registrar.py").read_text().splitlines()) < 60


def test_the_registrar_example_imports_no_anyio() -> None:
    text = (EXAMPLES / "asyncio_registrar.py").read_text()
    assert "anyio" not in text
    assert "import asyncio" in text


def test_the_registrar_example_answers_options(registrar: tuple[str, int]) -> None:
    answer = exchange(registrar, request("OPTIONS", "sip:example.test", branch="z9hG4bK-opt"))
    assert answer.status_code == 200
    allow = answer.headers.get("Allow") or ""
    assert {"REGISTER", "OPTIONS", "INVITE"} <= {m.strip() for m in allow.split(",")}


def test_the_registrar_example_challenges_then_accepts_a_register(
    registrar: tuple[str, int],
) -> None:
    uri = "sip:example.test"
    first = exchange(registrar, request("REGISTER", uri, branch="z9hG4bK-r1", call_id="reg-1"))
    assert first.status_code == 401
    challenge = sip.parse_challenge(first.headers.get("WWW-Authenticate") or "")
    assert challenge.realm == "example.test"
    authorization = authorize(bytes(first), "REGISTER", uri, "alice", "example.test", "wonderland")
    second = exchange(
        registrar,
        request(
            "REGISTER",
            uri,
            branch="z9hG4bK-r2",
            cseq=2,
            call_id="reg-1",
            authorization=authorization,
        ),
    )
    assert second.status_code == 200


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [("alice", "not-wonderland", "Bad credentials"), ("mallory", "x", "Unknown user")],
)
def test_the_registrar_example_refuses_wrong_credentials(
    registrar: tuple[str, int], user: str, password: str, reason: str
) -> None:
    uri = "sip:example.test"
    call_id = f"reg-{user}-{password}"
    first = exchange(
        registrar,
        request("REGISTER", uri, user=user, branch=f"z9hG4bK-{call_id}-1", call_id=call_id),
    )
    authorization = authorize(bytes(first), "REGISTER", uri, user, "example.test", password)
    second = exchange(
        registrar,
        request(
            "REGISTER",
            uri,
            user=user,
            branch=f"z9hG4bK-{call_id}-2",
            cseq=2,
            call_id=call_id,
            authorization=authorization,
        ),
    )
    assert (second.status_code, second.reason) == (403, reason)


# -- (b) examples/digest_filter.py -------------------------------------------------


LAYERS = {"_message", "_digest", "_sdp", "_errors"}  # issue 6: message, digest and SDP only


def test_the_filter_uses_only_the_message_digest_and_sdp_layers() -> None:
    tree = ast.parse((EXAMPLES / "digest_filter.py").read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "sip"
    }
    assert {"parse_message", "verify_response", "filter_offer"} <= used  # really read
    modules = {name: getattr(sip, name).__module__.rsplit(".", 1)[-1] for name in used}
    outside = {name: module for name, module in modules.items() if module not in LAYERS}
    assert not outside, outside


def load_filter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digest_filter", EXAMPLES / "digest_filter.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["digest_filter"] = module  # dataclasses look the module up while building
    spec.loader.exec_module(module)
    return module


digest_filter = load_filter()
REALM = "sip.kx21.com"
WALL = 1_780_000_000.0


def make_filter(secret: bytes | None = b"s" * 32) -> object:
    ha1s = {"alice": sip.compute_ha1("alice", REALM, "wonderland")}
    return digest_filter.DigestFilter(REALM, ha1s, secret)


def challenged(
    filter_: object, method: str = "INVITE", uri: str = "sip:17752180264@sip.kx21.com"
) -> bytes:
    verdict = filter_.check(request(method, uri, host=REALM), wall=WALL)  # type: ignore[attr-defined]
    assert verdict.status == 401
    return verdict.answer  # type: ignore[no-any-return]


def test_the_filter_challenges_a_request_without_credentials() -> None:
    answer = sip.parse_message(challenged(make_filter()))
    assert isinstance(answer, sip.Response)
    assert answer.status_code == 401
    challenge = sip.parse_challenge(answer.headers.get("WWW-Authenticate") or "")
    assert challenge.realm == REALM


def test_the_filter_passes_good_credentials_and_cuts_the_offer_to_g711() -> None:
    filter_ = make_filter()
    uri = "sip:17752180264@sip.kx21.com"
    authorization = authorize(challenged(filter_), "INVITE", uri, "alice", REALM, "wonderland")
    data = request("INVITE", uri, host=REALM, authorization=authorization, body=OFFER)
    verdict = filter_.check(data, wall=WALL + 1)  # type: ignore[attr-defined]
    assert (verdict.status, verdict.answer) == (200, b"")
    formats = sip.audio_formats(sip.parse_sdp(verdict.body))
    assert [encoding for _pt, encoding, _clock in formats] == ["PCMU", "PCMA", "telephone-event"]


def test_the_filter_answers_488_to_an_offer_without_g711() -> None:
    filter_ = make_filter()
    uri = "sip:17752180264@sip.kx21.com"
    authorization = authorize(challenged(filter_), "INVITE", uri, "alice", REALM, "wonderland")
    data = request("INVITE", uri, host=REALM, authorization=authorization, body=OPUS_ONLY)
    verdict = filter_.check(data, wall=WALL + 1)  # type: ignore[attr-defined]
    assert verdict.status == 488
    answer = sip.parse_message(verdict.answer)
    assert isinstance(answer, sip.Response)
    assert "Incompatible media format" in (answer.headers.get("Warning") or "")


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [("alice", "guess", "Bad credentials"), ("mallory", "x", "Unknown user")],
)
def test_the_filter_refuses_wrong_credentials(user: str, password: str, reason: str) -> None:
    filter_ = make_filter()
    uri = "sip:8005551212@sip.kx21.com"
    authorization = authorize(challenged(filter_, uri=uri), "INVITE", uri, user, REALM, password)
    data = request("INVITE", uri, user=user, host=REALM, authorization=authorization)
    verdict = filter_.check(data, wall=WALL + 1)  # type: ignore[attr-defined]
    assert (verdict.status, verdict.reason) == (403, reason)
    answer = sip.parse_message(verdict.answer)
    assert isinstance(answer, sip.Response) and answer.reason == reason


def test_the_filter_rechallenges_a_stale_nonce_and_a_forged_one() -> None:
    filter_ = make_filter()
    uri = "sip:sip.kx21.com"
    authorization = authorize(
        challenged(filter_, "REGISTER", uri), "REGISTER", uri, "alice", REALM, "wonderland"
    )
    data = request("REGISTER", uri, host=REALM, authorization=authorization)
    stale = filter_.check(data, wall=WALL + 3600)  # type: ignore[attr-defined]
    assert stale.status == 401
    assert sip.parse_challenge(
        sip.parse_message(stale.answer).headers.get("WWW-Authenticate") or ""
    ).stale
    other = make_filter(secret=b"another secret, another server")
    forged = other.check(data, wall=WALL + 1)  # type: ignore[attr-defined]
    assert forged.status == 401
    assert not sip.parse_challenge(
        sip.parse_message(forged.answer).headers.get("WWW-Authenticate") or ""
    ).stale


def test_the_filter_answers_a_broken_request_with_its_fault_and_drops_garbage() -> None:
    filter_ = make_filter()
    broken = request("INVITE", "sip:1@sip.kx21.com", host=REALM).replace(
        b"Call-ID: example-call-1\r\n", b""
    )
    verdict = filter_.check(broken, wall=WALL)  # type: ignore[attr-defined]
    assert (verdict.status, verdict.reason) == (400, "Missing Call-ID")
    assert filter_.check(b"\x00\x01 not SIP", wall=WALL).status == 0  # type: ignore[attr-defined]
    wrong_uri = request(
        "INVITE",
        "sip:1@sip.kx21.com",
        host=REALM,
        authorization='Digest username="alice", realm="sip.kx21.com", nonce="n", '
        'uri="sip:2@sip.kx21.com", response="00000000000000000000000000000000"',
    )
    assert filter_.check(wrong_uri, wall=WALL).status == 400  # type: ignore[attr-defined]


def test_the_filter_command_checks_a_captured_request(tmp_path: Path) -> None:
    filter_ = make_filter(secret=None)  # a capture's nonce came from another server
    uri = "sip:sip.kx21.com"
    first = filter_.check(request("REGISTER", uri, host=REALM), wall=WALL)  # type: ignore[attr-defined]
    assert first.status == 401
    challenge = sip.make_challenge(realm=REALM, nonce="captured-nonce")
    response = sip.answer_challenge(
        sip.parse_challenge(challenge),
        username="alice",
        ha1=sip.compute_ha1("alice", REALM, "wonderland"),
        method="REGISTER",
        uri=uri,
        cnonce="c0ffee",
    )
    capture = tmp_path / "register.sip"
    data = request("REGISTER", uri, host=REALM, authorization=sip.make_authorization(response))
    capture.write_bytes(data.replace(b"\r\n", b"\n"))  # as saved from a softphone log
    assert digest_filter.main([str(capture), "alice", "wonderland"]) == 0
    assert digest_filter.main([str(capture), "alice", "guess"]) == 1
    assert digest_filter.main([str(capture)]) == 2


# -- (b) over real sockets: the filter as a UDP front door ------------------------


class Upstream:
    """The service behind the filter: a UDP socket answering every request 200, with
    the body it received, from a thread; it keeps what reached it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.received: list[sip.Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            request = sip.parse_message(data)
            assert isinstance(request, sip.Request)
            self.received.append(request)
            answer = sip.make_response(
                request, 200, "OK", to_tag="up-1", headers=[("X-Upstream", "yes")]
            )
            self.sock.sendto(bytes(answer), source)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def front_door() -> Iterator[tuple[tuple[str, int], Upstream]]:
    upstream = Upstream()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        str(EXAMPLES / "digest_filter.py"),
        "--serve",
        "127.0.0.1:0",
        "{}:{}".format(*upstream.address),
        "alice",
        "wonderland",
        REALM,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=15):
                pytest.fail("the filter example did not start within 15 s")
        line = process.stdout.readline().decode()
        assert line.startswith("listening on "), line or process.stderr.read()  # type: ignore[union-attr]
        host, port = line.split()[-1].rsplit(":", 1)
        yield (host, int(port)), upstream
    finally:
        process.kill()
        process.wait(timeout=10)
        upstream.close()


def test_the_filter_in_front_of_a_service_over_udp(
    front_door: tuple[tuple[str, int], Upstream],
) -> None:
    door, upstream = front_door
    uri = "sip:17752180264@sip.kx21.com"

    def invite(branch: str, body: bytes, authorization: str | None = None) -> sip.Response:
        data = request(
            "INVITE", uri, host=REALM, branch=branch, authorization=authorization, body=body
        )
        return exchange(door, data)

    challenge = invite("z9hG4bK-fd1", OFFER)
    assert challenge.status_code == 401
    authorization = authorize(bytes(challenge), "INVITE", uri, "alice", REALM, "wonderland")
    assert upstream.received == []  # refused at the door

    passed = invite("z9hG4bK-fd2", OFFER, authorization)
    assert (passed.status_code, passed.headers.get("X-Upstream")) == (200, "yes")
    (forwarded,) = upstream.received
    assert forwarded.headers.get("Authorization") == authorization
    formats = sip.audio_formats(sip.parse_sdp(forwarded.body))
    assert [encoding for _pt, encoding, _clock in formats] == ["PCMU", "PCMA", "telephone-event"]

    opus_only = invite("z9hG4bK-fd3", OPUS_ONLY, authorization)
    assert opus_only.status_code == 488
    wrong = authorize(bytes(challenge), "INVITE", uri, "alice", REALM, "guess")
    refused = invite("z9hG4bK-fd4", OFFER, wrong)
    assert (refused.status_code, refused.reason) == (403, "Bad credentials")
    assert len(upstream.received) == 1  # only the one that passed
