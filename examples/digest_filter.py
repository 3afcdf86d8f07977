"""A digest-checking filter built from sansio_sip's message, digest and SDP layers
only (no Engine): what a proxy in front of a SIP service, or a support engineer
holding a customer's capture, can do with the layers one by one.

``DigestFilter.check(data, wall=...)`` parses one request, verifies its
Authorization against the stored HA1 (and, given the server's nonce secret,
the nonce: stateless nonces can be checked by any process holding the secret)
and returns a ``Verdict``: pass it on, or the answer to send back. An offer in
a request that passes is cut down to G.711 (``g711_only``), or refused with 488.

As a command, it checks a captured request against a password:

    python3 examples/digest_filter.py REQUEST_FILE USERNAME PASSWORD [REALM]

and prints the verdict (without a nonce secret, the nonce is not checked). Or it
stands in front of a SIP service on UDP, for one account:

    python3 examples/digest_filter.py --serve HOST:PORT UPSTREAM_HOST:PORT USERNAME PASSWORD [REALM]

answering 401/403/488/400 itself, forwarding what passes (offer cut to G.711) to
the upstream and the upstream's answers back (it prints "listening on HOST:PORT";
port 0 picks a free one). A toy proxy: no Via of its own, so the upstream must
answer to the source address (rport, RFC 3581), and answers go back by Call-ID.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

import sansio_sip as sip

USAGE = (
    "usage: digest_filter.py REQUEST_FILE USERNAME PASSWORD [REALM]\n"
    "       digest_filter.py --serve HOST:PORT UPSTREAM_HOST:PORT USERNAME PASSWORD [REALM]"
)
Headers = Iterable[tuple[str, str]]


@dataclass(frozen=True)
class Verdict:
    status: int  # 200: pass the request on; anything else: answer it with this status
    reason: str
    answer: bytes = b""  # the response to send back (empty when passed, or unanswerable)
    body: bytes = b""  # the request's body to forward (an offer cut down to G.711)
    forward: bytes = b""  # the request to pass on, with that body (empty unless passed)


def g711_only(body: bytes) -> bytes:
    """The SDP offer with only PCMU, PCMA and telephone-event left (kx-sipd's policy).
    Raises ParseError for a broken body and NoAcceptableCodec when nothing is left."""
    return sip.serialize_sdp(sip.filter_offer(sip.parse_sdp(body)))


class DigestFilter:
    def __init__(self, realm: str, ha1s: dict[str, str], secret: bytes | None = None) -> None:
        self.realm = realm
        self.ha1s = ha1s  # username -> MD5 HA1 for ``realm``: the filter never sees a password
        self.nonces = None if secret is None else sip.NonceFactory(secret)

    def check(self, data: bytes, *, wall: float) -> Verdict:
        try:
            request = sip.parse_message(data)
        except sip.ParseError as error:  # status_code None: drop it, there is nobody to answer
            return Verdict(error.status_code or 0, error.reason)
        if not isinstance(request, sip.Request):
            return Verdict(0, "Not a request")
        try:
            return self._check(request, wall=wall)
        except sip.UnsupportedScheme:  # Basic, Bearer...: RFC 3261 §22.1 wants Digest
            return self._challenge(request, wall=wall, stale=False)
        except sip.RemoteProtocolError as error:  # it carries the answer: 400 "Bad ...", 488
            return self._answer(request, error.status_code or 400, error.reason, error.headers)

    def _check(self, request: sip.Request, *, wall: float) -> Verdict:
        value = request.headers.get("Authorization")
        if value is None:
            return self._challenge(request, wall=wall, stale=False)
        credentials = sip.parse_authorization(value)  # ParseError: 400 naming the fault
        if credentials.uri != request.uri:  # RFC 2617 §3.2.2.5: it must name this request
            return self._answer(request, 400, "Digest URI does not match the Request-URI")
        ha1 = self.ha1s.get(credentials.username)
        if ha1 is None or credentials.realm != self.realm:
            return self._answer(request, 403, "Unknown user")
        if self.nonces is not None:
            status = self.nonces.check(credentials.nonce, wall=wall)
            if status is not sip.NonceStatus.VALID:  # stale: the client retries silently
                return self._challenge(request, wall=wall, stale=status is sip.NonceStatus.STALE)
        if credentials.algorithm != "MD5" or not sip.verify_response(
            credentials, ha1=ha1, method=request.method, realm=self.realm, body=request.body
        ):
            return self._answer(request, 403, "Bad credentials")
        body = request.body
        if request.content_type == "application/sdp" and body:
            body = g711_only(body)
        forward = bytes(sip.Request(request.method, request.uri, request.headers, body))
        return Verdict(200, "OK", body=body, forward=forward)

    def _challenge(self, request: sip.Request, *, wall: float, stale: bool) -> Verdict:
        if self.nonces is None:
            return self._answer(request, 401, "Unauthorized")  # nothing to sign a nonce with
        nonce = self.nonces.make(wall=wall, salt=os.urandom(8))
        challenge = sip.make_challenge(realm=self.realm, nonce=nonce, stale=stale)
        return self._answer(request, 401, "Unauthorized", [("WWW-Authenticate", challenge)])

    def _answer(
        self, request: sip.Request, status: int, reason: str, headers: Headers = ()
    ) -> Verdict:
        to_tag = os.urandom(6).hex()
        response = sip.make_response(request, status, reason, to_tag=to_tag, headers=headers)
        return Verdict(status, reason, answer=bytes(response))


def serve(sock: socket.socket, upstream: tuple[str, int], filter_: DigestFilter) -> NoReturn:
    """The front door: one datagram at a time, until the process is stopped."""
    clients: OrderedDict[str, tuple[str, int]] = OrderedDict()  # Call-ID -> who asked
    while True:
        data, source = sock.recvfrom(65535)
        if source[:2] == upstream:  # an answer from upstream: back to whoever asked
            try:
                client = clients.get(sip.parse_message(data).call_id)
            except sip.ParseError:
                continue
            if client is not None:
                sock.sendto(data, client)
            continue
        verdict = filter_.check(data, wall=time.time())
        if verdict.forward:
            call_id = sip.parse_message(verdict.forward).call_id
            clients[call_id] = source[:2]
            clients.move_to_end(call_id)
            if len(clients) > 10_000:  # bounded: the oldest calls are forgotten
                clients.popitem(last=False)
            sock.sendto(verdict.forward, upstream)
        elif verdict.answer:
            sock.sendto(verdict.answer, source)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"] and len(argv) in (5, 6):
        listen, upstream, username, password = argv[1:5]
        realm = argv[5] if len(argv) == 6 else "sip.kx21.com"
        ha1s = {username: sip.compute_ha1(username, realm, password)}
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(_address(listen))
        print("listening on {}:{}".format(*sock.getsockname()[:2]), flush=True)
        serve(sock, _address(upstream), DigestFilter(realm, ha1s, os.urandom(32)))
    if len(argv) not in (3, 4):
        print(USAGE, file=sys.stderr)
        return 2
    path, username, password = argv[:3]
    realm = argv[3] if len(argv) == 4 else "sip.kx21.com"
    with open(path, "rb") as file:
        data = file.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # saved with LF
    ha1s = {username: sip.compute_ha1(username, realm, password)}
    verdict = DigestFilter(realm, ha1s).check(data, wall=time.time())
    print(verdict.status, verdict.reason)
    return 0 if verdict.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
