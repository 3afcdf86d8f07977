"""RFC 3261 §17 timers as absolute deadlines.

Theory of operation: every transaction timer is named by its RFC letter
(``TimerName.A`` … ``TimerName.K`` from RFC 3261 Table 4, plus ``L`` and ``M``
from RFC 6026 §8.4–8.5) and stored as an absolute deadline in monotonic
seconds, the way aioquic's ``get_timer`` / ``handle_timer`` and resiprocate's
``rutil/Timer.hxx`` do. The owner of a deadline is an opaque hashable object
(a transaction record); a ``TimerQueue`` keeps at most one deadline per
(owner, letter) pair.

The queue is a binary heap with lazy deletion: re-arming or cancelling a timer
only updates a dict, and the stale heap entry is discarded when it reaches the
top. ``next_deadline`` and ``pop_due`` therefore cost O(log n) amortised per
change. So that stale entries cannot pile up (a peer decides how many
transactions arrive, DESIGN §7), the heap is rebuilt from the live deadlines
whenever stale entries outnumber live ones by more than ``_COMPACT_SLACK``.

This module knows nothing about SIP messages; it never reads a clock (the
caller passes ``now``).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["TimerName", "TimerQueue"]


class TimerName(enum.Enum):
    """Transaction timers by their RFC letter (RFC 3261 Table 4, RFC 6026 §8)."""

    A = "A"  # INVITE client: request retransmission (unreliable only), T1 doubling
    B = "B"  # INVITE client: transaction timeout, 64*T1
    D = "D"  # INVITE client: wait for response retransmissions, >= 32 s unreliable, 0 reliable
    E = "E"  # non-INVITE client: request retransmission (unreliable only), T1 doubling to T2
    F = "F"  # non-INVITE client: transaction timeout, 64*T1
    G = "G"  # INVITE server: final response retransmission (unreliable only), T1 doubling to T2
    H = "H"  # INVITE server: wait for ACK, 64*T1
    I = "I"  # INVITE server: absorb ACK retransmissions, T4 unreliable, 0 reliable  # noqa: E741
    J = "J"  # non-INVITE server: absorb request retransmissions, 64*T1 unreliable, 0 reliable
    K = "K"  # non-INVITE client: absorb response retransmissions, T4 unreliable, 0 reliable
    L = "L"  # INVITE server, RFC 6026 Accepted: absorb INVITE retransmissions, 64*T1
    M = "M"  # INVITE client, RFC 6026 Accepted: accept 2xx retransmissions, 64*T1

    # Members are singletons: identity hashing is exact and, unlike Enum's
    # name hashing, costs no Python call on every dict look-up.
    __hash__ = object.__hash__


OwnerT = TypeVar("OwnerT", bound=Hashable)

# Rebuild the heap when it holds more than twice the live deadlines plus this
# many stale entries: small tables never pay for a rebuild, big ones stay
# within a constant factor of their live size.
_COMPACT_SLACK = 64


class TimerQueue(Generic[OwnerT]):
    """Deadlines keyed by (owner, timer letter), ordered by a lazy-deletion heap.

    ``arm`` replaces any deadline the same (owner, letter) already had;
    ``cancel`` and ``cancel_all`` forget deadlines; ``pop_due(now)`` returns the
    earliest deadline that is ``<= now`` (ties in arming order) and forgets it.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, OwnerT, TimerName]] = []
        # owner -> letter -> (deadline, arming sequence); a heap entry is live
        # only while this still holds its (deadline, sequence).
        self._armed: dict[OwnerT, dict[TimerName, tuple[float, int]]] = {}
        self._count = 0
        self._sequence = itertools.count()

    def __len__(self) -> int:
        """Number of armed (live) deadlines."""
        return self._count

    def arm(self, owner: OwnerT, name: TimerName, deadline: float) -> None:
        """Set ``owner``'s timer ``name`` to fire at ``deadline`` (absolute seconds)."""
        sequence = next(self._sequence)
        timers = self._armed.get(owner)
        if timers is None:
            timers = self._armed[owner] = {}
        if name not in timers:
            self._count += 1
        timers[name] = (deadline, sequence)
        heapq.heappush(self._heap, (deadline, sequence, owner, name))
        if len(self._heap) > 2 * self._count + _COMPACT_SLACK:
            self._compact()

    def cancel(self, owner: OwnerT, name: TimerName) -> None:
        """Forget ``owner``'s timer ``name`` if it is armed."""
        timers = self._armed.get(owner)
        if timers is not None and timers.pop(name, None) is not None:
            self._count -= 1
            if not timers:
                del self._armed[owner]

    def cancel_all(self, owner: OwnerT) -> None:
        """Forget every timer of ``owner``."""
        timers = self._armed.pop(owner, None)
        if timers is not None:
            self._count -= len(timers)

    def deadline(self, owner: OwnerT, name: TimerName) -> float | None:
        """The absolute deadline of ``owner``'s timer ``name``, or None when not armed."""
        entry = self._armed.get(owner, {}).get(name)
        return None if entry is None else entry[0]

    def deadlines(self, owner: OwnerT) -> dict[TimerName, float]:
        """Every armed timer of ``owner`` with its deadline."""
        return {name: entry[0] for name, entry in self._armed.get(owner, {}).items()}

    def next_deadline(self) -> float | None:
        """The earliest armed deadline, or None when nothing is armed."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[OwnerT, TimerName, float] | None:
        """Remove and return (owner, name, deadline) of the earliest deadline ``<= now``.

        Returns None when no armed deadline is due.
        """
        self._drop_stale_top()
        if not self._heap or self._heap[0][0] > now:
            return None
        deadline, _sequence, owner, name = heapq.heappop(self._heap)
        self.cancel(owner, name)
        return owner, name, deadline

    def _drop_stale_top(self) -> None:
        heap = self._heap
        armed = self._armed
        while heap:
            deadline, sequence, owner, name = heap[0]
            timers = armed.get(owner)
            if timers is not None and timers.get(name) == (deadline, sequence):
                return
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [
            (deadline, sequence, owner, name)
            for owner, timers in self._armed.items()
            for name, (deadline, sequence) in timers.items()
        ]
        heapq.heapify(self._heap)
