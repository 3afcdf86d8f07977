"""The control protocol's framing (docs/relay-protocol.md has the full description).

A datagram is ``MAGIC | tag | body``: a 4-byte magic ``KXR1``, a 16-byte tag
(HMAC-SHA256 of the body with the shared secret, truncated), and an orjson
body (a JSON object). Requests carry ``c`` (cookie), ``op`` and ``ts`` (the
sender's wall clock); replies carry the same ``c`` and ``ok``. Both
directions are authenticated, so neither a forged command nor a forged
reply (which would steer media) is accepted.

This module is pure: it only builds and checks bytes.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson

__all__ = [
    "MAGIC",
    "MAX_DATAGRAM",
    "BadDatagram",
    "open_datagram",
    "seal",
]

MAGIC = b"KXR1"
TAG_SIZE = 16
MAX_DATAGRAM = 65000
"""Bodies stay under the IPv4 UDP limit (65,507) with room for the frame."""


class BadDatagram(Exception):
    """A control datagram that is not ours, is forged, or does not parse. The
    receiver drops it and counts it under ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _tag(secret: bytes, body: bytes) -> bytes:
    # hmac.digest: the one-shot C path, without building an HMAC object.
    return hmac.digest(secret, body, "sha256")[:TAG_SIZE]


def seal(secret: bytes, message: dict[str, Any]) -> bytes:
    """The datagram carrying ``message``. Raises BadDatagram("too-large") past MAX_DATAGRAM."""
    body = orjson.dumps(message)
    if len(body) + len(MAGIC) + TAG_SIZE > MAX_DATAGRAM:
        raise BadDatagram("too-large")
    return MAGIC + _tag(secret, body) + body


def open_datagram(secret: bytes, data: bytes) -> dict[str, Any]:
    """The message in ``data``, after checking magic and tag.

    Raises BadDatagram with reason "not-ours", "bad-tag" or "bad-body".
    """
    head = len(MAGIC) + TAG_SIZE
    if len(data) < head + 2 or data[: len(MAGIC)] != MAGIC:
        raise BadDatagram("not-ours")
    body = data[head:]
    if not hmac.compare_digest(data[len(MAGIC) : head], _tag(secret, body)):
        raise BadDatagram("bad-tag")
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadDatagram("bad-body") from None
    if not isinstance(message, dict) or not isinstance(message.get("c"), str):
        raise BadDatagram("bad-body")
    return message
