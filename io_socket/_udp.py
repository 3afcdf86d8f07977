"""UDP for the blocking driver: one datagram socket per listen address.

The loop in server.py hands this module a UDP socket the selector found
readable, and each ``Send`` on UDP. A datagram is one whole message, so it is
fed to the engine as soon as it is read (``handle``: the loop's steps 2-4).

* At most ``udp_batch`` datagrams are read per wake-up, so one busy socket
  cannot starve TCP connections and timers; what waits longer stays in the
  kernel's receive buffer, and beyond that the kernel drops it (options.py).
* Datagrams leave from the first listen address of the destination's family
  (docs/embedding.md).
* A full kernel send buffer is a counted drop: SIP's retransmissions are built
  for loss. Any other send error is reported to the engine (``transport_failed``).
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from functools import partial

from sansio_sip import Address, Send, Transport

from ._report import Report
from ._seams import DrivenEngine, Input, MessageTrace
from ._sockets import address
from .options import DriverOptions

__all__ = ["UdpSockets"]


class UdpSockets:
    """The server's UDP sockets. ``handle`` feeds an input to the engine now,
    ``transport_failed`` reports a ``Send`` that could not go out."""

    def __init__(
        self,
        engine: DrivenEngine,
        options: DriverOptions,
        selector: selectors.BaseSelector,
        report: Report,
        trace: MessageTrace | None,
        *,
        handle: Callable[[Input], None],
        transport_failed: Callable[[Send, str], None],
    ) -> None:
        self._engine = engine
        self._options = options
        self._selector = selector
        self._report = report
        self._counters = report.counters
        self._trace = trace
        self._handle = handle
        self._transport_failed = transport_failed
        self.sockets: list[socket.socket] = []
        self._by_family: dict[socket.AddressFamily, socket.socket] = {}
        self._local: dict[socket.socket, Address] = {}

    def add(self, sock: socket.socket) -> None:
        """Keep a bound socket (the server binds it beside its TCP listener)."""
        # Datagrams leave from the first listen address of their family (see docs).
        self._by_family.setdefault(sock.family, sock)
        self.sockets.append(sock)
        self._local[sock] = address(sock.getsockname())

    def listen(self) -> None:
        """Read each socket when the selector finds it readable."""
        for sock in self.sockets:
            self._selector.register(sock, selectors.EVENT_READ, partial(self._receive, sock))

    def send(self, action: Send) -> None:
        host, port = action.destination
        sock = self._by_family.get(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if sock is None:
            self._transport_failed(action, "no UDP socket of that address family")
            return
        try:
            sock.sendto(action.data, (host, port))
        except BlockingIOError:
            # The kernel's send buffer is full: as good as lost on the wire, and SIP's
            # retransmissions (§17.1.1.2) are built for exactly that.
            self._report.dropped("udp_send_dropped", "udp.send_buffer_full", action.destination)
            return
        except OSError as exc:
            self._transport_failed(action, repr(exc))
            return
        self._counters["udp_sent"] += 1
        if self._trace is not None:
            self._report.traced(
                self._trace.sent,
                action.data,
                destination=action.destination,
                local=self._local[sock],
                transport=Transport.UDP,
                wall=time.time(),
            )

    def _receive(self, sock: socket.socket, _mask: int) -> None:
        engine, options = self._engine, self._options
        for _ in range(options.udp_batch):
            try:
                data, source = sock.recvfrom(options.max_datagram)
            except BlockingIOError:
                return
            except OSError as exc:
                # Linux reports some ICMP errors on the next receive; they name no request.
                self._counters["udp_receive_errors"] += 1
                self._report.note("debug", "udp.receive_error", error=repr(exc))
                continue
            self._counters["udp_received"] += 1
            peer = (source[0], source[1])
            if self._trace is not None:
                self._report.traced(
                    self._trace.received,
                    data,
                    source=peer,
                    local=self._local[sock],
                    transport=Transport.UDP,
                    connection=None,
                    wall=time.time(),
                )
            feed = partial(engine.receive, data, source=peer, transport=Transport.UDP)
            self._handle(Input(feed, "udp", data))
