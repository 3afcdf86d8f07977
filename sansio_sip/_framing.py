"""Stream framing: cut a TCP byte stream into whole SIP messages (RFC 3261 §18.3).

On a stream the header block ends at the first empty line and the body is
exactly Content-Length octets; the header is mandatory ("MUST be used with
stream oriented transports"). The framer knows nothing else about SIP: it
returns the bytes of each message for ``parse_message`` and keeps the rest.

Keep-alives (RFC 5626 §4.4.1): a client pings with a double CRLF between
messages and expects a single CRLF back. Each ping is counted in
``keepalives`` and adds one to ``pongs_due``; the caller answers with one
``b"\\r\\n"`` per ``take_pongs()``. A lone CRLF before a start line is
skipped (RFC 3261 §7.5).

Framing errors cannot be recovered on a stream (the next message boundary
is unknown), so they raise ``ParseError`` with the status to answer (400 for
a missing, invalid or conflicting Content-Length, 513 for a header block or
body over the limit; ``None`` when the broken message is a response) and the
caller must then close the connection, after answering the broken request
from ``rejected`` when it can (RFC 3261 §18.3, §21.5.14). Limits bound the memory one
connection can hold: at most ``max_header_bytes + max_body_bytes`` plus one
chunk.
"""

from __future__ import annotations

import re
from typing import NoReturn

from ._errors import ParseError

__all__ = ["StreamFramer"]

# A Content-Length header line (long or compact form), any case, LWS before
# the colon; the value is checked separately so a bad one is reported.
_CONTENT_LENGTH = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_FOLD = re.compile(rb"\r\n[ \t]+")


class StreamFramer:
    """Feed arbitrary chunks of one TCP connection; get whole messages back."""

    __slots__ = (
        "_buffer",
        "_scan_from",
        "keepalives",
        "max_body_bytes",
        "max_header_bytes",
        "pongs_due",
        "rejected",
    )

    def __init__(self, *, max_header_bytes: int = 16384, max_body_bytes: int = 65536) -> None:
        # 16 KiB of headers is four times what long real-world INVITEs carry
        # (RFC 4475 longreq is ~3 KiB); 64 KiB of body covers any SDP and
        # matches the largest UDP datagram.
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.keepalives = 0
        """Double-CRLF pings seen on this connection (RFC 5626 §4.4.1)."""
        self.pongs_due = 0
        """Pings not yet answered; the caller sends one CRLF for each."""
        self.rejected = b""
        """After a framing error: the start of the broken message (at most
        ``max_header_bytes``), from which the caller may answer it before it
        closes the connection (``stateless_error_response`` reads its head)."""
        self._buffer = bytearray()
        self._scan_from = 0  # where the search for the end of headers resumes

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def take_pongs(self) -> int:
        """How many single-CRLF pongs to send now; resets ``pongs_due``."""
        due = self.pongs_due
        self.pongs_due = 0
        return due

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every message now complete, in order.

        Raises ``ParseError`` on a framing error (see the module notes); the
        connection must then be closed.
        """
        buf = self._buffer
        buf += data
        out: list[bytes] = []
        while buf:
            if buf[0] in (0x0D, 0x0A):
                consumed = self._skip_crlfs(buf)
                if consumed is None:
                    break  # maybe a ping, not complete yet
                continue
            message = self._cut_one(buf)
            if message is None:
                break
            out.append(message)
        return out

    def _skip_crlfs(self, buf: bytearray) -> int | None:
        """Consume a ping or a stray line break at the buffer start; return how
        many bytes, or None when more bytes are needed to tell."""
        self._scan_from = 0
        if buf.startswith(b"\r\n\r\n"):
            del buf[:4]
            self.keepalives += 1
            self.pongs_due += 1
            return 4
        if buf[0] == 0x0A:
            del buf[:1]  # a bare LF between messages: tolerated, like a CRLF
            return 1
        if len(buf) < 2 or (buf[1] == 0x0A and (len(buf) == 2 or buf[2:] == b"\r")):
            return None  # "\r", "\r\n" or "\r\n\r": wait for the rest
        if buf[1] != 0x0A:
            self._error(buf, "Bad message start", 400)
        del buf[:2]  # §7.5: a CRLF before a start line is ignored
        return 2

    def _error(self, buf: bytearray, reason: str, status: int) -> NoReturn:
        is_response = bytes(buf[:4]) == b"SIP/"
        self.rejected = bytes(buf[: self.max_header_bytes])
        raise ParseError(reason, None if is_response else status)

    def _cut_one(self, buf: bytearray) -> bytes | None:
        end = buf.find(b"\r\n\r\n", max(0, self._scan_from - 3))
        if end < 0:
            if len(buf) > self.max_header_bytes:
                self._error(buf, "Message Too Large: header block", 513)
            self._scan_from = len(buf)
            return None
        if end > self.max_header_bytes:
            self._error(buf, "Message Too Large: header block", 513)
        head = bytes(buf[:end])
        if b"\r\n " in head or b"\r\n\t" in head:
            head = _FOLD.sub(b" ", head)
        values = {m.group(1).strip(b" \t") for m in _CONTENT_LENGTH.finditer(head)}
        if not values:
            self._error(buf, "Missing Content-Length", 400)
        if len(values) > 1:
            self._error(buf, "Conflicting Content-Length", 400)
        text = values.pop()
        if not text.isdigit() or len(text) > 10:
            self._error(buf, "Bad Content-Length", 400)
        length = int(text)
        if length > self.max_body_bytes:
            self._error(buf, "Message Too Large: body", 513)
        total = end + 4 + length
        if len(buf) < total:
            self._scan_from = end  # the header end is known; wait for the body
            return None
        message = bytes(buf[:total])
        del buf[:total]
        self._scan_from = 0
        return message
