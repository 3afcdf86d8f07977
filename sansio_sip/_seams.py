"""The seams a driver plugs the outside world into.

The engine never calls these: it returns ``LookupAccount``, ``AllocateMedia``,
``CallRecord`` ... actions, and the driver performs them with objects that
satisfy these Protocols, then feeds the results back. Defining them here lets
both drivers and the application agree on one shape without importing each
other (DESIGN.md §1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ._actions import Action
from ._model import Account, Address, CallRecordData, MediaAllocation, MediaStats, Transport

__all__ = [
    "AccountStore",
    "DrivenEngine",
    "Entropy",
    "MediaRelay",
    "MediaUnavailable",
    "MessageTrace",
    "StoreUnavailable",
]

Entropy = Callable[[int], bytes]
"""Returns ``n`` random bytes. Production passes ``os.urandom``; tests pass a seeded source."""


class StoreUnavailable(Exception):
    """The account/record store cannot answer now (file unreadable, locked past
    its deadline, disk error, database down). Requests needing it get 503."""


class MediaUnavailable(Exception):
    """The relay cannot serve the request (down, timed out, ports exhausted)."""


class AccountStore(Protocol):
    """What a driver needs from the operator's store. Methods may block; the
    AnyIO driver runs them in a worker thread under a deadline."""

    def get_account(self, username: str) -> Account | None:
        """The account, or None when no such user exists. Raises StoreUnavailable."""
        ...

    def write_call_record(self, record: CallRecordData) -> None:
        """Insert or update (by call_ref) durably. Raises StoreUnavailable."""
        ...

    def attach_media_stats(
        self, call_ref: str, a_leg: MediaStats | None, b_leg: MediaStats | None
    ) -> None:
        """Store the relay's final per-leg figures on the record. Raises StoreUnavailable."""
        ...


class MediaRelay(Protocol):
    """What a driver needs from the RTP relay (local supervisor or remote host)."""

    def allocate(self, call_ref: str, *, a_peer: Address | None, echo: bool) -> MediaAllocation:
        """Reserve a port pair per side. Idempotent per call_ref. Raises MediaUnavailable."""
        ...

    def update(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None = None,
        b_events: int | None = None,
    ) -> None:
        """Record where each side's media is expected from, and the payload
        type each side numbers RFC 4733 telephone-event with (the relay
        rewrites one into the other when they differ, DESIGN §7). Raises
        MediaUnavailable."""
        ...

    def release(self, call_ref: str) -> tuple[MediaStats | None, MediaStats | None]:
        """Free the ports; returns the final (A-leg, B-leg) statistics."""
        ...

    def expired(self) -> list[tuple[str, str]]:
        """Calls the relay ended on its own since the last poll, as
        (call_ref, reason) with reason "media-timeout" or "relay-lost"."""
        ...


class DrivenEngine(Protocol):
    """The part of ``Engine`` a driver calls (keyword ``now``/``wall`` everywhere):
    what io_anyio and io_socket are typed against, so a test can drive them with
    a fake engine."""

    def receive(
        self,
        data: bytes,
        *,
        source: Address,
        transport: Transport,
        now: float,
        wall: float,
        connection: int | None = None,
    ) -> list[Action]:
        """A UDP datagram or a TCP chunk (``Engine.receive``)."""

    def connection_closed(self, connection: int, *, now: float, wall: float) -> list[Action]:
        """A TCP connection closed (``Engine.connection_closed``)."""

    def handle_timer(self, *, now: float, wall: float) -> list[Action]:
        """The earliest deadline has passed (``Engine.handle_timer``)."""

    def next_timer(self) -> float | None:
        """When to call ``handle_timer`` next, or None (``Engine.next_timer``)."""

    def account_found(
        self, token: int, account: Account | None, *, now: float, wall: float
    ) -> list[Action]:
        """The answer to a ``LookupAccount`` (``Engine.account_found``)."""

    def account_unavailable(self, token: int, *, now: float, wall: float) -> list[Action]:
        """A ``LookupAccount`` the store could not answer (``Engine.account_unavailable``)."""

    def media_allocated(
        self, token: int, allocation: MediaAllocation, *, now: float, wall: float
    ) -> list[Action]:
        """The answer to an ``AllocateMedia`` (``Engine.media_allocated``)."""

    def media_failed(self, token: int, reason: str, *, now: float, wall: float) -> list[Action]:
        """An ``AllocateMedia`` the relay refused (``Engine.media_failed``)."""

    def media_ended(self, call_ref: str, reason: str, *, now: float, wall: float) -> list[Action]:
        """The relay ended a call's media (``Engine.media_ended``)."""

    def transport_failed(
        self, destination: Address, transport: Transport, *, now: float, wall: float
    ) -> list[Action]:
        """A ``Send`` could not go out (``Engine.transport_failed``)."""

    def stop_accepting(self, *, now: float, wall: float) -> list[Action]:
        """Graceful shutdown, step one (``Engine.stop_accepting``)."""

    def end_all_calls(self, *, now: float, wall: float) -> list[Action]:
        """Graceful shutdown, step two (``Engine.end_all_calls``)."""

    @property
    def active_calls(self) -> int:
        """Calls up (``Engine.active_calls``)."""

    @property
    def idle(self) -> bool:
        """Nothing left in flight (``Engine.idle``)."""


class MessageTrace(Protocol):
    """An observer a driver tells of every SIP datagram or TCP chunk it reads and
    every message it sends, in its loop (so it must not block). ``local`` is our
    socket's address (``("", 0)`` when unknown, e.g. while a TCP connection we
    opened is not yet connected); ``connection`` the TCP connection id (None on UDP)."""

    def received(
        self,
        data: bytes,
        *,
        source: Address,
        local: Address,
        transport: Transport,
        connection: int | None,
        wall: float,
    ) -> None:
        """``data`` was read from ``source`` on our socket ``local``."""

    def sent(
        self,
        data: bytes,
        *,
        destination: Address,
        local: Address,
        transport: Transport,
        wall: float,
    ) -> None:
        """``data`` was sent to ``destination`` from our socket ``local``."""

    def connection_closed(self, connection: int) -> None:
        """A TCP connection it was told of has closed."""
