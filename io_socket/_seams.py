"""What io_socket's ``Server`` is given, and what its parts hand to the loop.

``DrivenEngine`` (the part of ``sansio_sip.Engine`` the loop calls) and
``MessageTrace`` (the optional observer of messages) are the core's seams,
re-exported here for the package's modules and by io_socket. ``Input`` is one thing for the engine: server.py's ``_handle`` feeds it at once,
and what performing an action produces (a back-end's answer, a closed
connection) is queued as one and fed before the loop waits again (server.py,
steps 3 and 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from sansio_sip import Action, CallRecordData, DrivenEngine, Log, MessageTrace

__all__ = ["DrivenEngine", "Input", "LogSink", "MessageTrace", "RecordSink"]

LogSink = Callable[[Log], None]
RecordSink = Callable[[CallRecordData], None]


class Input(NamedTuple):
    """One thing for the engine: ``feed(now=..., wall=...)``, a name and the bytes (for bug reports)."""

    feed: Callable[..., Sequence[Action]]
    what: str
    data: bytes = b""
