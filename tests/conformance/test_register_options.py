"""Issue 3 over the wire: REGISTER with digest, OPTIONS, 405/400/505, rport, store failure.

Every test runs against the real ``kx-sipd serve`` once per driver (conftest.py).
The promises checked are the customer guide's (§6.1, §8, §9) and RFC 3261/3581's.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import (
    ACCOUNTS,
    REALM,
    SUSPENDED,
    SipClient,
    SipServer,
    challenge_params,
    digest_response,
)

ALLOWED = {"REGISTER", "OPTIONS", "INVITE", "ACK", "BYE", "CANCEL"}


def _methods(header: str | None) -> set[str]:
    return {method.strip() for method in (header or "").split(",") if method.strip()}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_register_without_credentials_is_challenged(server: SipServer, transport: str) -> None:
    with server.client(transport) as client:
        request = client.request("REGISTER", headers=(("Expires", "300"),))
        (response,) = [r for r in client.exchange(request) if r.status >= 200]
    assert (response.status, response.reason) == (401, "Unauthorized")
    header = response.header("WWW-Authenticate") or ""
    assert header.startswith("Digest ")
    params = challenge_params(header)
    assert params["realm"] == REALM
    assert params["nonce"]
    assert params["algorithm"] == "MD5"
    assert params["qop"] == "auth"
    # The quoting the guide's clients expect: realm and qop quoted, algorithm a token.
    assert f'realm="{REALM}"' in header and 'qop="auth"' in header
    assert re.search(r"algorithm=MD5\b", header)
    assert response.header("Call-ID") == client.call_id
    assert "tag=" in (response.header("To") or "")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_register_with_good_credentials_is_accepted(server: SipServer, transport: str) -> None:
    with server.client(transport) as client:
        response = client.register("alice", ACCOUNTS["alice"], expires=300)
        assert (response.status, response.reason) == (200, "OK"), response.raw
        contact = response.header("Contact") or ""
        host, port = client.local
        assert f"sip:alice@{host}:{port}" in contact
        expires = re.search(r"expires=(\d+)", contact) or re.search(
            r"(\d+)", response.header("Expires") or ""
        )
        assert expires is not None and int(expires.group(1)) > 0


def test_register_expires_granted_as_the_guide_says(server: SipServer) -> None:
    # Guide §8: no binding is kept; 200 OK enables the dial button. What is granted is a
    # sane value, never more than asked.
    with server.client() as client:
        response = client.register("alice", ACCOUNTS["alice"], expires=120)
        assert response.status == 200
        contact = response.header("Contact") or ""
        granted = re.search(r"expires=(\d+)", contact)
        value = int(granted.group(1)) if granted else int(response.header("Expires") or "0")
        assert 0 < value <= 300


@pytest.mark.parametrize("user", ["nobody", *SUSPENDED])
def test_unknown_or_suspended_user_is_403_unknown_user(server: SipServer, user: str) -> None:
    password = SUSPENDED.get(user, "whatever")
    with server.client() as client:
        response = client.register(user, password)
    assert (response.status, response.reason) == (403, "Unknown user")


def test_wrong_password_is_403_bad_credentials(server: SipServer) -> None:
    with server.client() as client:
        response = client.register("alice", "not-the-password")
    assert (response.status, response.reason) == (403, "Bad credentials")


def test_credentials_for_another_realm_are_bad_credentials(server: SipServer) -> None:
    with server.client() as client:
        first = client.final(client.request("REGISTER"))
        nonce = challenge_params(first.header("WWW-Authenticate") or "")["nonce"]
        uri = f"sip:{REALM}"
        digest = digest_response(
            "alice", ACCOUNTS["alice"], "REGISTER", uri, nonce, realm="other.example"
        )
        authorization = (
            f'Digest username="alice", realm="other.example", nonce="{nonce}", uri="{uri}", '
            f'response="{digest}", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"'
        )
        response = client.final(
            client.request("REGISTER", headers=(("Authorization", authorization),))
        )
    assert (response.status, response.reason) == (403, "Bad credentials")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_options_is_answered_with_capabilities(server: SipServer, transport: str) -> None:
    with server.client(transport) as client:
        response = client.final(client.request("OPTIONS"))
    assert response.status == 200
    assert _methods(response.header("Allow")) == ALLOWED
    assert "application/sdp" in (response.header("Accept") or "")
    assert response.header("Supported") is not None


@pytest.mark.parametrize("method", ["SUBSCRIBE", "MESSAGE", "INFO", "PUBLISH"])
def test_other_methods_are_405_with_allow(server: SipServer, method: str) -> None:
    with server.client() as client:
        response = client.final(client.request(method))
    assert (response.status, response.reason) == (405, "Method Not Allowed")
    assert _methods(response.header("Allow")) == ALLOWED


def test_malformed_request_is_400_naming_the_fault(server: SipServer) -> None:
    with server.client() as client:
        request = client.request("OPTIONS")
        without_call_id = re.sub(rb"Call-ID: [^\r]*\r\n", b"", request)
        response = client.final(without_call_id)
    assert response.status == 400
    assert "call-id" in response.reason.lower()


def test_bad_cseq_is_400(server: SipServer) -> None:
    with server.client() as client:
        request = client.request("OPTIONS").replace(b" OPTIONS\r\nContact", b" INVITE\r\nContact")
        response = client.final(request)
    assert response.status == 400
    assert "cseq" in response.reason.lower()


def test_unsupported_sip_version_is_505(server: SipServer) -> None:
    with server.client() as client:
        request = client.request("OPTIONS").replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1)
        response = client.final(request)
    assert response.status == 505


def test_response_goes_to_the_source_with_received_and_rport(server: SipServer) -> None:
    # RFC 3581 §4: the Via claims another address (a NATed client's private one; here a
    # loopback alias so nothing can leave this machine); the answer must come back to the
    # address the request came from, saying where that was.
    with server.client() as client:
        host, port = client.local
        via = "Via: SIP/2.0/UDP 127.0.0.2:5999;branch=z9hG4bKnat1;rport"
        response = client.final(client.request("OPTIONS", via=via))
    (top,) = response.all("Via")[:1]
    assert f"rport={port}" in top
    assert f"received={host}" in top
    assert "127.0.0.2:5999" in top


def test_retransmitted_register_is_answered_again_without_a_new_challenge(
    server: SipServer,
) -> None:
    with server.client() as client:
        request = client.request("REGISTER")
        first = client.final(request)
        again = client.final(request)  # same branch: absorbed by the server transaction
    assert first.status == again.status == 401
    assert first.header("WWW-Authenticate") == again.header("WWW-Authenticate")


def test_a_final_answer_to_an_invite_is_retransmitted_until_acked(server: SipServer) -> None:
    """RFC 3261 §17.2.1: over UDP the server transaction sends a non-2xx final answer to
    an INVITE again (Timer G) until the ACK comes, then absorbs the ACK and stays quiet."""
    with server.client() as client:
        uri = f"sip:15551234567@{REALM}"
        first = client.final(client.request("INVITE", uri))
        assert first.status == 401
        again = client.receive()  # no ACK sent: the same 401 again after T1
        assert again is not None and again.raw == first.raw
        via = first.all("Via")[0]
        lines = [
            f"ACK {uri} SIP/2.0",
            f"Via: {via}",
            "Max-Forwards: 70",
            f"From: {first.header('From')}",
            f"To: {first.header('To')}",
            f"Call-ID: {first.header('Call-ID')}",
            f"CSeq: {first.header('CSeq').split()[0]} ACK",  # type: ignore[union-attr]
            "Content-Length: 0",
        ]
        client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        client.receive(timeout=0.3)  # one already on its way may still come
        assert client.receive(timeout=1.5) is None, "the 401 went on after its ACK"


def test_password_change_by_the_cli_is_seen_by_the_next_register(fresh_server: SipServer) -> None:
    with fresh_server.client() as client:
        assert client.register("carol", ACCOUNTS["carol"]).status == 200
        fresh_server.cli("accounts", "passwd", "carol", "--password", "carol-new")
        old = client.register("carol", ACCOUNTS["carol"])
        assert (old.status, old.reason) == (403, "Bad credentials")
        assert client.register("carol", "carol-new").status == 200
        fresh_server.cli("accounts", "suspend", "carol")
        suspended = client.register("carol", "carol-new")
        assert (suspended.status, suspended.reason) == (403, "Unknown user")


def _break_accounts(db: Path, broken: bool) -> None:
    """Make the running server's account look-ups fail (the table gone, as after a botched
    migration or a disk fault), or heal them. Touching a row first bumps the store's
    generation counter (a trigger), so the server's cache is dropped and it must ask SQLite."""
    old, new = ("accounts", "accounts_away") if broken else ("accounts_away", "accounts")
    with sqlite3.connect(db, isolation_level=None, timeout=5) as connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(f"UPDATE {old} SET status = status")
        connection.execute(f"ALTER TABLE {old} RENAME TO {new}")
        connection.execute("COMMIT")
    connection.close()


def test_store_failure_is_503_with_retry_after_then_recovers(fresh_server: SipServer) -> None:
    with fresh_server.client() as client:
        assert client.register("dave", ACCOUNTS["dave"]).status == 200
        _break_accounts(fresh_server.db, broken=True)
        try:
            response = client.register("dave", ACCOUNTS["dave"])
            assert (response.status, response.reason) == (503, "Service Unavailable")
            assert (response.header("Retry-After") or "").strip().isdigit()
        finally:
            _break_accounts(fresh_server.db, broken=False)
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline and status != 200:
            status = client.register("dave", ACCOUNTS["dave"]).status
        assert status == 200
    assert any('"store.failed"' in line for line in fresh_server.log_lines())


def test_sigterm_stops_the_server_cleanly(fresh_server: SipServer) -> None:
    with fresh_server.client() as client:
        assert client.final(client.request("OPTIONS")).status == 200
    assert fresh_server.stop() == 0
    log = "\n".join(fresh_server.log_lines())
    assert '"server.started"' in log
    assert '"driver.stopped"' in log


def test_one_client_many_requests_over_one_tcp_connection(server: SipServer) -> None:
    with SipClient(server.address, "tcp") as client:
        requests = b"".join(client.request("OPTIONS") for _ in range(5))
        client.send(requests)
        statuses = [client.receive() for _ in range(5)]
    assert [response and response.status for response in statuses] == [200] * 5
