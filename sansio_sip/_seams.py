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

from ._model import Account, Address, CallRecordData, MediaAllocation, MediaStats

__all__ = [
    "AccountStore",
    "Entropy",
    "MediaRelay",
    "MediaUnavailable",
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
