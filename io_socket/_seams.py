"""What io_socket's ``Server`` is given, and what its parts hand to the loop.

``DrivenEngine`` is the part of ``sansio_sip.Engine`` the loop calls and
``MessageTrace`` the optional observer of messages (both exported by io_socket).
``Input`` is one thing for the engine: server.py's ``_handle`` feeds it at once,
and what performing an action produces (a back-end's answer, a closed
connection) is queued as one and fed before the loop waits again (server.py,
steps 3 and 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from sansio_sip import Account, Action, Address, CallRecordData, Log, MediaAllocation, Transport

__all__ = ["DrivenEngine", "Input", "LogSink", "MessageTrace", "RecordSink"]

LogSink = Callable[[Log], None]
RecordSink = Callable[[CallRecordData], None]


class DrivenEngine(Protocol):
    """The part of ``sansio_sip.Engine`` a driver calls (keyword ``now``/``wall`` everywhere)."""

    def receive(
        self,
        data: bytes,
        *,
        source: Address,
        transport: Transport,
        now: float,
        wall: float,
        connection: int | None = None,
    ) -> list[Action]: ...
    def connection_closed(self, connection: int, *, now: float, wall: float) -> list[Action]: ...
    def handle_timer(self, *, now: float, wall: float) -> list[Action]: ...
    def next_timer(self) -> float | None: ...
    def account_found(
        self, token: int, account: Account | None, *, now: float, wall: float
    ) -> list[Action]: ...
    def account_unavailable(self, token: int, *, now: float, wall: float) -> list[Action]: ...
    def media_allocated(
        self, token: int, allocation: MediaAllocation, *, now: float, wall: float
    ) -> list[Action]: ...
    def media_failed(self, token: int, reason: str, *, now: float, wall: float) -> list[Action]: ...
    def media_ended(
        self, call_ref: str, reason: str, *, now: float, wall: float
    ) -> list[Action]: ...
    def transport_failed(
        self, destination: Address, transport: Transport, *, now: float, wall: float
    ) -> list[Action]: ...
    def stop_accepting(self, *, now: float, wall: float) -> list[Action]: ...
    def end_all_calls(self, *, now: float, wall: float) -> list[Action]: ...
    @property
    def active_calls(self) -> int: ...
    @property
    def idle(self) -> bool: ...


class MessageTrace(Protocol):
    """Told of every SIP datagram or TCP chunk read and every message sent (in the loop:
    it must not block). ``local`` is our socket's address (("", 0) when unknown);
    ``connection`` the TCP connection id (None on UDP)."""

    def received(
        self,
        data: bytes,
        *,
        source: Address,
        local: Address,
        transport: Transport,
        connection: int | None,
        wall: float,
    ) -> None: ...
    def sent(
        self,
        data: bytes,
        *,
        destination: Address,
        local: Address,
        transport: Transport,
        wall: float,
    ) -> None: ...
    def connection_closed(self, connection: int) -> None: ...


class Input(NamedTuple):
    """One thing for the engine: ``feed(now=..., wall=...)``, a name and the bytes (for bug reports)."""

    feed: Callable[..., Sequence[Action]]
    what: str
    data: bytes = b""
