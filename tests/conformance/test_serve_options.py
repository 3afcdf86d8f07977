"""The serve options a driver applies itself, over the wire, once per driver.

``kx-sipd serve`` hands most options to the engine, the relay or the application,
which are the same whichever driver runs; these are the ones each driver applies
on its own sockets (kx_sipd/app.py ``_serve``): the TCP connection limits and the
idle timeout; and ``--max-message-size``, which the engine applies to what each
driver reads (a datagram whole, a TCP stream in the chunks the driver cuts). (``--listen`` is every test's; ``--shutdown-grace`` is in
test_lifecycle.py; ``--store-timeout`` is in tests/unit/test_driver.py, since a
store slow on purpose needs a fake.) Loopback aliases (127.0.0.2, 127.0.0.3) give
the per-address limit other addresses to count.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WAIT, SipClient, SipServer, copy_database, start_server

Start = Callable[..., SipServer]


@pytest.fixture
def start(driver: str, template_db: Path, tmp_path: Path) -> Iterator[Start]:
    started: list[SipServer] = []

    def start(*extra: str) -> SipServer:
        server = start_server(driver, tmp_path, copy_database(template_db, tmp_path), *extra)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def connect(server: SipServer, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(WAIT)
    sock.connect(server.address)
    return sock


def serves(server: SipServer, sock: socket.socket) -> bool:
    """True when an OPTIONS on ``sock`` is answered 200; False when the server has
    closed the connection (an answer lost on a connection refused after accept)."""
    client = SipClient(server.address, "tcp", sock=sock)
    try:
        client.send(client.request("OPTIONS"))
        response = client.receive()
    except (BrokenPipeError, ConnectionResetError):
        return False
    return response is not None and response.status == 200


def closed_by_server(sock: socket.socket, wait: float = WAIT) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_tcp_connection_limits_per_address_and_in_all(start: Start) -> None:
    server = start("--max-tcp-per-ip", "2", "--max-tcp-connections", "3")
    held = [connect(server), connect(server)]
    try:
        assert all(serves(server, sock) for sock in held)
        third = connect(server)  # the kernel accepts it; the driver closes it at once
        held.append(third)
        assert closed_by_server(third), "a third connection from 127.0.0.1 was kept"
        other = connect(server, "127.0.0.2")  # another address has its own count
        held.append(other)
        assert serves(server, other)
        over = connect(server, "127.0.0.3")  # but 3 in all is the server's limit
        held.append(over)
        assert closed_by_server(over), "a fourth connection in all was kept"
        assert all(serves(server, sock) for sock in (held[0], held[1], other))
    finally:
        for sock in held:
            sock.close()
    log = "\n".join(server.log_lines())
    assert '"tcp.refused"' in log or '"tcp.rejected"' in log, log[-3000:]


def test_an_idle_tcp_connection_is_closed_after_the_idle_timeout(start: Start) -> None:
    server = start("--tcp-idle-timeout", "1")
    with connect(server) as idle, connect(server) as busy:
        assert serves(server, idle) and serves(server, busy)
        started = time.monotonic()
        # The busy one keeps talking every 0.3 s; the idle one says nothing.
        closed = False
        while time.monotonic() - started < 1 + WAIT and not closed:
            assert serves(server, busy), "the busy connection was closed"
            idle.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                closed = idle.recv(1) == b""
        assert closed, "the idle connection was kept"
        assert time.monotonic() - started >= 1 - 0.1, "closed before the idle timeout"
        assert serves(server, busy)


def test_the_message_size_limit_holds_on_udp_and_tcp(start: Start) -> None:
    server = start("--max-message-size", "2048")
    body = b"x" * 3000
    with server.client() as udp:
        small = udp.request("OPTIONS", headers=(("Content-Type", "text/plain"),), body=b"ok")
        assert udp.final(small).status == 200
        big = udp.request("OPTIONS", headers=(("Content-Type", "text/plain"),), body=body)
        assert udp.final(big).status == 513
    with SipClient(server.address, "tcp") as tcp:
        small = tcp.request("OPTIONS", headers=(("Content-Type", "text/plain"),), body=b"ok")
        assert tcp.final(small).status == 200
        tcp.send(tcp.request("OPTIONS", headers=(("Content-Type", "text/plain"),), body=body))
        response = tcp.receive()
        assert response is not None and response.status == 513
        assert closed_by_server(tcp.sock)
