"""Binding the listen sockets, and the address helpers the other modules share.

Each listen address gets a UDP socket and a TCP listener on the same port
(server.py ``_bind`` keeps them; ``_tcp.py`` accepts on the listener). Nothing
here reads or writes SIP.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from sansio_sip import Address

__all__ = ["address", "bind_pair", "format_addresses"]


def bind_pair(
    host: str, port: int, receive_buffer: int
) -> tuple[socket.socket, socket.socket, int]:
    """UDP and TCP on the same port of one listen address (port 0: one free for both).
    Returns the UDP socket, the TCP listener and the bound port."""
    for _attempt in range(20):
        udp = _bind_udp(host, port, receive_buffer)
        bound: int = udp.getsockname()[1]
        try:
            listener = _bind_tcp(host, bound)
        except OSError:
            udp.close()
            if port == 0:
                continue  # the free UDP port was taken for TCP: try another
            raise
        return udp, listener, bound
    raise OSError(f"no port free for both UDP and TCP on {host}")


def _bind_udp(host: str, port: int, receive_buffer: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Bursts wait in the kernel while the loop works; the kernel caps this at rmem_max.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def address(sockaddr: Any) -> Address:
    """(host, port) of a socket address of either family."""
    return (str(sockaddr[0]), int(sockaddr[1]))


def format_addresses(addresses: Sequence[Address]) -> str:
    """Addresses for a log line, IPv6 hosts in brackets."""
    return " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
