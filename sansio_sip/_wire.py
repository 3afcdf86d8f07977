"""Answers for messages too broken to parse, and small wire-format helpers.

When the parser rejects a request (bad request line, malformed CSeq, wrong
version ...) the engine still owes the client an answer that names the fault
(400, 505, 513: RFC 3261 §8.2, §21.4). Building it cannot go through the
message model, which refused the input, so this module works on the raw
bytes: it copies the header fields a response must echo (§8.2.6.2: Via,
From, To, Call-ID, CSeq), exactly as received, and nothing else. Without a
Via there is nowhere principled to answer, so the message is dropped; the
same for responses and ACKs, which are never answered.
"""

from __future__ import annotations

__all__ = ["format_address", "stateless_error_response"]

_ECHOED = {
    b"via": b"Via",
    b"v": b"Via",
    b"from": b"From",
    b"f": b"From",
    b"to": b"To",
    b"t": b"To",
    b"call-id": b"Call-ID",
    b"i": b"Call-ID",
    b"cseq": b"CSeq",
}
_MAX_ECHOED_BYTES = 8192  # never amplify a hostile request into a large answer


def format_address(address: tuple[str, int]) -> str:
    """``ip:port``, with IPv6 literals in brackets (RFC 3986 §3.2.2)."""
    host, port = address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def stateless_error_response(
    data: bytes,
    status_code: int,
    reason: str,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    to_tag: str | None = None,
) -> bytes | None:
    """The bytes of a ``status_code`` answer to the raw request ``data``, or
    None when it must not be answered (a response, an ACK, no Via)."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    request_line = lines[0].strip() if lines else b""
    if not request_line or request_line.startswith(b"SIP/"):
        return None
    method = request_line.split(b" ", 1)[0]
    if method.upper() == b"ACK":
        return None
    fields: list[list[bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b" " + line.strip()
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        canonical = _ECHOED.get(name.strip().lower())
        if canonical is not None:
            fields.append([canonical, value.strip()])
    if not any(name == b"Via" for name, _ in fields):
        return None
    reason_bytes = _clean(reason).encode("utf-8", "replace")
    out = [b"SIP/2.0 %d %s" % (status_code, reason_bytes)]
    size = 0
    for name, value in fields:
        if name == b"To" and to_tag is not None and b";tag=" not in value.lower():
            value = value + b";tag=" + to_tag.encode("ascii")
        size += len(value)
        if size > _MAX_ECHOED_BYTES:
            break
        out.append(name + b": " + value)
    for name_text, value_text in headers:
        out.append(f"{_clean(name_text)}: {_clean(value_text)}".encode("utf-8", "replace"))
    out.append(b"Content-Length: 0")
    return b"\r\n".join(out) + b"\r\n\r\n"


def _clean(text: str) -> str:
    """No CR, LF or NUL may reach the wire from a reason or an extra header."""
    return text.replace("\r", " ").replace("\n", " ").replace("\x00", " ")
