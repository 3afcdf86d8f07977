"""Plain data the engine works with but does not own: transports, addresses,
accounts and routes (from the operator's store), media allocations (from the
relay) and call records (to the store).

These are frozen attrs classes so they can cross process and thread
boundaries and be compared in tests. Nothing here parses SIP.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "Account",
    "Address",
    "CallRecordData",
    "LadderEntry",
    "MediaAllocation",
    "MediaStats",
    "Route",
    "Transport",
]

Address = tuple[str, int]
"""An (IP literal, port) pair. IPv6 literals are given without brackets."""


class Transport(enum.Enum):
    """The SIP transports kx-sipd speaks (guide §2: UDP preferred, or TCP)."""

    UDP = "UDP"
    TCP = "TCP"

    @property
    def reliable(self) -> bool:
        """RFC 3261 §17: timers that only cover loss are not armed on reliable transports."""
        return self is Transport.TCP


@attrs.frozen(kw_only=True)
class Route:
    """A carrier trunk an account's calls are handed to (an IP trunk, no auth)."""

    name: str
    host: str
    port: int = 5060
    transport: Transport = Transport.UDP
    strip: int = 0
    prefix: str = ""

    def digits_for(self, dialed: str) -> str:
        """The digits sent to the carrier: strip ``strip`` leading digits, then prepend ``prefix``."""
        return self.prefix + dialed[self.strip :]


@attrs.frozen(kw_only=True)
class Account:
    """One customer credential, as the store hands it to the engine.

    ``ha1`` maps a digest algorithm name ("MD5", "SHA-256") to the hex HA1 for
    the store's realm; plain passwords never reach the engine.
    ``allowed_prefixes`` empty means every destination is allowed.
    ``allowed_sources`` are CIDR strings; empty means any source address.
    """

    username: str
    ha1: dict[str, str] = attrs.field(factory=dict)
    active: bool = True
    route: Route | None = None
    allowed_prefixes: tuple[str, ...] = ()
    max_calls: int | None = None
    max_cps: float | None = None
    caller_id: str | None = None
    allowed_sources: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class MediaAllocation:
    """What the relay reserved for a call.

    ``a_*`` faces the client (A-leg), ``b_*`` faces the carrier (B-leg). RTCP
    is on the RTP port + 1. For the echo test only the A side is used and the
    B fields repeat the A ones.
    """

    call_ref: str
    a_address: str
    a_port: int
    b_address: str
    b_port: int


@attrs.frozen(kw_only=True)
class MediaStats:
    """Per-leg media figures the relay reports when a call's media is released."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    packets_lost: int = 0
    jitter_ms: float = 0.0


@attrs.frozen(kw_only=True)
class LadderEntry:
    """One SIP message of a call's ladder: when, which way, with whom, the text."""

    wall: float
    direction: str  # "in" or "out"
    leg: str  # "A" (client) or "B" (carrier)
    peer: str  # "ip:port" (IPv6 bracketed)
    transport: str
    message: str


@attrs.frozen(kw_only=True)
class CallRecordData:
    """A call record (DESIGN.md §4). Written when a call starts (``end_wall`` is
    None) and again when it ends; the store upserts by ``call_ref``.

    Times are wall-clock UTC seconds since the epoch, as passed in by the driver.
    ``ended_by`` is one of: "client", "carrier", "cancel", "timeout",
    "media-timeout", "error", "shutdown", "restart", "rejected".
    """

    call_ref: str
    account: str
    a_call_id: str
    b_call_id: str | None
    source: str
    transport: str
    user_agent: str
    dialed: str
    sent_digits: str | None
    route: str | None
    start_wall: float
    answer_wall: float | None = None
    end_wall: float | None = None
    final_status: int | None = None
    ended_by: str | None = None
    reason: str | None = None
    codec: str | None = None
    ladder: tuple[LadderEntry, ...] = ()

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, or None while the call is up."""
        if self.end_wall is None:
            return None
        return max(0.0, self.end_wall - self.start_wall)

    @property
    def billable(self) -> int:
        """Whole seconds from answer to end, rounded up (carriers bill started seconds)."""
        if self.answer_wall is None or self.end_wall is None:
            return 0
        seconds = self.end_wall - self.answer_wall
        whole = int(seconds)
        return whole + (1 if seconds - whole > 1e-6 else 0)
