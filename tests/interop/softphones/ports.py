"""Free loopback ports for the servers and clients the softphone tests start.

Everything is picked below the kernel's ephemeral range (32768 and up) so that a
client socket opened meanwhile cannot be handed the same port, and blocks of
consecutive ports are checked free for UDP as a whole.
"""

from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"

_taken: set[int] = set()


def _free(port: int, *, tcp: bool) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.bind((HOST, port))
        except OSError:
            return False
    if not tcp:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream:
        try:
            stream.bind((HOST, port))
        except OSError:
            return False
    return True


def free_block(size: int, *, tcp: bool = False, even: bool = True) -> int:
    """The first of ``size`` consecutive loopback ports, all free right now (UDP,
    and TCP too when asked), never handed out before by this process."""
    for _ in range(300):
        first = random.randrange(10000, 32000 - size, 2 if even else 1)
        block = range(first, first + size)
        if _taken.intersection(block):
            continue
        if all(_free(port, tcp=tcp) for port in block):
            _taken.update(block)
            return first
    raise RuntimeError(f"no block of {size} free loopback ports")


def free_port(*, tcp: bool = False) -> int:
    """One free loopback port (UDP, and TCP too when asked)."""
    return free_block(1, tcp=tcp, even=False)
