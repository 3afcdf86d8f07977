"""Actions: what the engine asks its driver to do.

Every public engine method returns a list of these, in the order they must be
performed. They are frozen, slotted, keyword-only attrs classes; drivers
dispatch on the concrete class with ``match`` and never subclass them.

Work that lives outside the engine and may be slow or fail (the account
store, the RTP relay) is an action carrying a ``token``; the driver performs
it and feeds the result back with the matching ``Engine`` method
(``account_found`` / ``account_unavailable``, ``media_allocated`` /
``media_failed``).
"""

from __future__ import annotations

import attrs

from ._model import Address, CallRecordData, Transport

__all__ = [
    "Action",
    "AllocateMedia",
    "CallRecord",
    "CloseConnection",
    "Log",
    "LookupAccount",
    "ReleaseMedia",
    "Send",
    "UpdateMedia",
]


@attrs.frozen(kw_only=True)
class Send:
    """Send ``data`` to ``destination`` over ``transport``.

    For TCP, ``connection`` names the accepted connection a response or an
    in-dialog request must reuse (RFC 3261 §18.2.2); ``None`` means open (or
    reuse) a connection to ``destination``.
    """

    data: bytes
    destination: Address
    transport: Transport
    connection: int | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 < self.destination[1] < 65536:
            raise ValueError(f"destination port out of range: {self.destination[1]}")


@attrs.frozen(kw_only=True)
class CloseConnection:
    """Close a stream connection (framing error, idle, or limit)."""

    connection: int
    reason: str


@attrs.frozen(kw_only=True)
class LookupAccount:
    """Fetch the account ``username``; answer with ``Engine.account_found``
    (the ``Account`` or ``None`` when unknown) or ``Engine.account_unavailable``."""

    token: int
    username: str


@attrs.frozen(kw_only=True)
class AllocateMedia:
    """Reserve relay ports for a call; answer with ``Engine.media_allocated``
    or ``Engine.media_failed``. ``echo`` asks for a single side that echoes
    every packet back to its sender (the echo-test destination)."""

    token: int
    call_ref: str
    a_peer: Address | None
    echo: bool = False


@attrs.frozen(kw_only=True)
class UpdateMedia:
    """Tell the relay where each side's media is expected to come from (from
    the SDP). The relay still latches to the first real source. ``a_events``
    and ``b_events`` are the telephone-event payload types each side's SDP
    declared: a client that keeps sending its own number although the answer
    renumbered the events gets them rewritten (DESIGN §7)."""

    call_ref: str
    a_peer: Address | None = None
    b_peer: Address | None = None
    a_events: int | None = None
    b_events: int | None = None


@attrs.frozen(kw_only=True)
class ReleaseMedia:
    """Free a call's relay ports. The driver attaches the relay's final
    per-leg statistics to the call record named by ``call_ref``."""

    call_ref: str


@attrs.frozen(kw_only=True)
class CallRecord:
    """Write (insert or update, keyed by ``record.call_ref``) a call record.
    A record with ``end_wall`` None marks a call in progress, so a restart can
    close it; the final record must be durable before the driver goes on."""

    record: CallRecordData


@attrs.frozen(kw_only=True)
class Log:
    """A structured log event: ``level`` is "debug", "info", "warning" or
    "error"; ``event`` a stable key; ``fields`` the structured values."""

    level: str
    event: str
    fields: tuple[tuple[str, str | int | float | None], ...] = ()

    def as_dict(self) -> dict[str, str | int | float | None]:
        """The fields as a dict (a later field of the same name wins)."""
        return dict(self.fields)


Action = (
    Send
    | CloseConnection
    | LookupAccount
    | AllocateMedia
    | UpdateMedia
    | ReleaseMedia
    | CallRecord
    | Log
)
