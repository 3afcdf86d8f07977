"""Protocol errors.

One abstract base, two concrete kinds (the h11 habit):

* ``LocalProtocolError``: the code driving the engine asked for something the
  protocol does not allow in the current state. It escapes at once.
* ``RemoteProtocolError``: the peer sent something illegal. It carries what a
  server should answer: a status code, a reason phrase that names the fault,
  and any extra header fields the answer needs (``Allow``, ``Unsupported``,
  ``Retry-After``). ``status_code`` is ``None`` when the input cannot be
  answered (a broken response, an ACK, an unframeable datagram) and must be
  dropped and counted instead.

``ParseError`` is the remote error raised by the message, URI, header, digest
and SDP parsers.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ParseError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of every protocol error raised by ``sansio_sip``."""

    def __init__(self, reason: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a concrete subclass")
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """The caller asked the engine for something illegal in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something illegal; carries the answer a server should give.

    ``status_code`` is the response to send (400, 413, 416, 420, 505, ...) or
    ``None`` when the message must be dropped silently (and counted).
    ``headers`` are extra header fields for that response, as (name, value).
    """

    def __init__(
        self,
        reason: str,
        status_code: int | None = 400,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.headers = headers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, status_code={self.status_code!r})"


class ParseError(RemoteProtocolError):
    """A message, URI, header, auth header or SDP body could not be parsed."""
