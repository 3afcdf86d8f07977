"""TCP framing over the wire, once per driver (RFC 3261 §18.3, RFC 5626 §4.4.1).

On a stream the driver hands the engine chunks as the kernel cuts them, and the
engine's framer finds the messages; these tests cut the stream where a real
network can (one byte at a time, between header and body, two messages and a
half in one write), send keep-alive pings, and break the framing (no
Content-Length, a header block or a body over the limits): the client is told
why (400 naming the Content-Length fault, 513 for the size: RFC 3261 §18.3,
§21.5.14) and that connection is closed, nothing else. conftest's client sends
with Nagle off, so each ``send`` leaves as a segment of its own.
"""

from __future__ import annotations

import socket
import time

from conftest import WAIT, SipClient, SipServer

MAX_MESSAGE = 65_535  # kx-sipd serve --max-message-size's default


def tcp_client(server: SipServer) -> SipClient:
    client = SipClient(server.address, "tcp")
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def answered_then_closed(client: SipClient) -> tuple[int, str]:
    """The answer the server sent before closing (status, reason), asserting the close."""
    response = client.receive()
    assert response is not None, "closed (or silent) without an answer"
    assert closed_by_server(client), "answered but not closed"
    return response.status, response.reason


def closed_by_server(client: SipClient, wait: float = WAIT) -> bool:
    """True when the server closes the connection within ``wait`` (whatever it sent
    before is read and dropped)."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        client.sock.settimeout(left)
        try:
            if not client.sock.recv(65535):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def still_serving(server: SipServer) -> None:
    with tcp_client(server) as client:
        assert client.final(client.request("OPTIONS")).status == 200


def test_a_request_written_one_byte_at_a_time_is_answered(server: SipServer) -> None:
    with tcp_client(server) as client:
        for byte in client.request("OPTIONS"):
            client.send(bytes([byte]))
        response = client.receive()
    assert response is not None and response.status == 200


def test_a_body_sent_after_a_pause_completes_its_request(server: SipServer) -> None:
    with tcp_client(server) as client:
        body = b"x" * 300
        request = client.request("OPTIONS", headers=(("Content-Type", "text/plain"),), body=body)
        head, body_part = request[: -len(body) - 1], request[-len(body) - 1 :]
        client.send(head)
        assert client.receive(timeout=0.5) is None  # nothing answered on half a message
        client.send(body_part)
        response = client.receive()
    assert response is not None and response.status == 200


def test_two_and_a_half_requests_in_one_write_then_the_rest(server: SipServer) -> None:
    with tcp_client(server) as client:
        requests = [client.request("OPTIONS") for _ in range(3)]
        stream = b"".join(requests)
        cut = len(requests[0]) + len(requests[1]) + len(requests[2]) // 2
        client.send(stream[:cut])
        first = [client.receive(), client.receive()]
        assert [r and r.status for r in first] == [200, 200]
        assert client.receive(timeout=0.5) is None
        client.send(stream[cut:])
        third = client.receive()
    assert third is not None and third.status == 200
    assert [r.header("CSeq") for r in (*first, third) if r] == [
        "1 OPTIONS",
        "2 OPTIONS",
        "3 OPTIONS",
    ]


def test_a_keepalive_ping_gets_one_crlf_and_the_connection_serves_on(server: SipServer) -> None:
    with tcp_client(server) as client:
        client.send(b"\r\n\r\n")
        client.sock.settimeout(WAIT)
        pong = client.sock.recv(65535)
        assert pong == b"\r\n"
        client.send(client.request("OPTIONS"))
        response = client.receive()
    assert response is not None and response.status == 200


def test_a_request_without_content_length_closes_that_connection_only(server: SipServer) -> None:
    """§18.3: Content-Length "MUST be used with stream oriented transports"; without it
    the next message's start cannot be found, so the connection is closed."""
    with tcp_client(server) as client, tcp_client(server) as bystander:
        request = client.request("OPTIONS")
        client.send(request.replace(b"Content-Length: 0\r\n", b""))
        status, reason = answered_then_closed(client)
        assert status == 400 and "content-length" in reason.lower(), (status, reason)
        assert bystander.final(bystander.request("OPTIONS")).status == 200
    still_serving(server)


def test_the_same_request_over_udp_needs_no_content_length(server: SipServer) -> None:
    with server.client() as client:
        request = client.request("OPTIONS").replace(b"Content-Length: 0\r\n", b"")
        assert client.final(request).status == 200


def test_a_header_block_past_the_limit_closes_the_connection(server: SipServer) -> None:
    with tcp_client(server) as client:
        head = client.request("OPTIONS").split(b"\r\n\r\n", 1)[0] + b"\r\n"
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        client.send(head)  # the Via first, so that the answer has somewhere to go
        for _ in range(MAX_MESSAGE // len(filler) + 8):  # past the limit, never a blank line
            try:
                client.send(filler)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert answered_then_closed(client)[0] == 513
    still_serving(server)


def test_a_body_announced_past_the_limit_closes_the_connection(server: SipServer) -> None:
    with tcp_client(server) as client:
        request = client.request("OPTIONS").replace(
            b"Content-Length: 0", f"Content-Length: {MAX_MESSAGE * 4}".encode()
        )
        client.send(request + b"y" * 1000)
        assert answered_then_closed(client)[0] == 513
    still_serving(server)
