"""Events the transaction layer hands to its transaction user (TU).

The TU is the engine (the call layer above RFC 3261 §17). These are frozen,
slotted attrs records named with past-tense nouns (STYLE §2), the h11
``_events.py`` habit. They are returned in the same lists as ``Send`` actions,
in the order things happened; the engine dispatches on the concrete class.

Every transaction that leaves the layer is reported exactly once by one of the
three terminal events: ``TransactionTimedOut`` (Timer B, F or H),
``TransportFailed`` (the transport reported the destination unreachable), or
``TransactionTerminated`` (every other end: Timers D, I, J, K, L, M, or a zero
timer on a reliable transport). After a terminal event the layer keeps no
reference to the transaction, so the TU may drop its own. One exception, from
RFC 6026 §7.1: an INVITE server transaction in Accepted reports a transport
error and stays (the TU may still reach the peer); its end comes later as
``TransactionTerminated``. ``event.transaction.state`` tells the two apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ._timers import TimerName

if TYPE_CHECKING:
    from ._message import Response
    from ._transaction import ClientTransaction, ServerTransaction

__all__ = [
    "Event",
    "ResponseReceived",
    "TransactionTerminated",
    "TransactionTimedOut",
    "TransportFailed",
]


@attrs.frozen
class ResponseReceived:
    """A response the TU must see: every 1xx, the first final response, and
    (RFC 6026 §7.2) each 2xx retransmission of an INVITE in the Accepted state,
    so the TU re-sends its ACK."""

    transaction: ClientTransaction
    response: Response


@attrs.frozen
class TransactionTimedOut:
    """The transaction gave up.

    Client side: Timer B (INVITE) or Timer F (non-INVITE) fired before a final
    response; the TU acts as if it received 408 Request Timeout (RFC 3261
    §17.1.1.2, §8.1.3.1). Server side: Timer H fired, so no ACK came for a
    non-2xx final response (§17.2.1).
    """

    transaction: ClientTransaction | ServerTransaction
    timer: TimerName


@attrs.frozen
class TransportFailed:
    """The transport could not reach the transaction's peer (ICMP unreachable,
    refused or reset connection; RFC 3261 §17.1.4, §17.2.4). A client TU
    acts as if it received 503 Service Unavailable (§8.1.3.1)."""

    transaction: ClientTransaction | ServerTransaction


@attrs.frozen
class TransactionTerminated:
    """The transaction ended quietly (its absorption timer ran out) and is gone."""

    transaction: ClientTransaction | ServerTransaction


Event = ResponseReceived | TransactionTimedOut | TransportFailed | TransactionTerminated
"""Anything the transaction layer reports to its TU."""
