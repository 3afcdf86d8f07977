#!/usr/bin/env python3
"""The floor for bench/relay.py: a minimal single-process asyncio RTP relay.

N port pairs starting at BASE (call i uses BASE+2i for the caller side and
BASE+2i+1 for the callee side). Each side latches to the source of the last
packet it received, and a packet is forwarded out of the other side's socket
to that side's latched source. No control protocol, no statistics, no
anti-hijack: the least a Python relay can do, for comparison.

Usage: relay_floor.py HOST BASE N   (prints "ready" once bound; runs until killed)
"""

from __future__ import annotations

import asyncio
import sys


class Side(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.peer: tuple[str, int] | None = None
        self.other: Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peer = addr
        other = self.other
        if other is not None and other.peer is not None and other.transport is not None:
            other.transport.sendto(data, other.peer)


async def serve(host: str, base: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    for i in range(count):
        caller, callee = Side(), Side()
        caller.other, callee.other = callee, caller
        await loop.create_datagram_endpoint(lambda s=caller: s, local_addr=(host, base + 2 * i))
        await loop.create_datagram_endpoint(lambda s=callee: s, local_addr=(host, base + 2 * i + 1))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
