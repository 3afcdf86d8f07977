"""Dialogs from kx-sipd's side (RFC 3261 §12): the state one leg of a call
keeps, and the requests kx-sipd builds inside it.

A ``Leg`` is one dialog of a B2BUA call: the client's dialog (A, where
kx-sipd is the UAS) or the carrier's (B, where kx-sipd is the UAC). It holds
what §12.2.1.1 needs to build a request in the dialog (Call-ID, tags, the
remote target, the route set, the local CSeq) plus where the request really
goes: for the client, the address its requests came from (NAT, DESIGN §2),
never a private Contact. Building messages here keeps ``_call`` about the
call's state machine only.
"""

from __future__ import annotations

import attrs

from ._errors import ParseError
from ._headers import parse_contact, parse_name_addr
from ._message import Headers, Request, Response
from ._model import Address, Transport
from ._uri import SipUri, format_host, parse_uri

__all__ = [
    "ALLOW_IN_DIALOG",
    "Leg",
    "contact_uri",
    "contact_value",
    "dialed_digits",
    "make_cancel",
    "make_request",
    "synthetic_response",
    "user_of",
    "without_tag",
]

ALLOW_IN_DIALOG = "INVITE, ACK, BYE, CANCEL, OPTIONS"
"""The Allow of kx-sipd's INVITEs and 2xx: what a peer may send in the dialog."""

_SDP = "application/sdp"


@attrs.define(slots=True, eq=False)
class Leg:
    """One dialog of the call, from kx-sipd's side of it."""

    name: str  # "A" (client) or "B" (carrier)
    call_id: str
    local_tag: str
    local_header: str  # our name-addr (From of our requests), without tag
    remote_header: str  # their name-addr, with their tag once known
    remote_target: str  # Request-URI of in-dialog requests
    destination: Address
    transport: Transport
    connection: int | None
    route_set: tuple[str, ...] = ()
    remote_tag: str | None = None
    local_cseq: int = 0
    last_sdp: bytes = b""  # the last SDP we sent on this leg (offerless re-INVITE answer)


def contact_value(sip_address: Address, transport: Transport) -> str:
    """kx-sipd's own Contact: where in-dialog requests must come."""
    host, port = sip_address
    tail = ";transport=tcp" if transport is Transport.TCP else ""
    return f"<sip:{format_host(host)}:{port}{tail}>"


def make_request(
    leg: Leg,
    method: str,
    *,
    sip_address: Address,
    branch: str,
    user_agent: str,
    extra: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    cseq: int | None = None,
) -> Request:
    """A request of ours inside ``leg``'s dialog (§12.2.1.1). Without ``cseq``
    the leg's local CSeq is incremented and used (an ACK passes its INVITE's)."""
    if cseq is None:
        leg.local_cseq += 1
        cseq = leg.local_cseq
    host, port = sip_address
    fields = [
        ("Via", f"SIP/2.0/{leg.transport.value} {format_host(host)}:{port};branch={branch};rport")
    ]
    for route in leg.route_set:
        fields.append(("Route", route))
    if not any(name.lower() == "max-forwards" for name, _ in extra):
        fields.append(("Max-Forwards", "70"))
    fields += (
        ("From", f"{leg.local_header};tag={leg.local_tag}"),
        ("To", leg.remote_header),
        ("Call-ID", leg.call_id),
        ("CSeq", f"{cseq} {method}"),
    )
    if method == "INVITE":
        fields.append(("Contact", contact_value(sip_address, leg.transport)))
    fields += extra
    if method == "INVITE":
        fields.append(("Allow", ALLOW_IN_DIALOG))
    fields.append(("User-Agent", user_agent))
    if body:
        fields.append(("Content-Type", _SDP))
    return Request(method, leg.remote_target, Headers(fields), body)


def make_cancel(invite: Request, *, user_agent: str) -> Request:
    """The CANCEL for our ``invite`` (§9.1): same Request-URI, Call-ID, From,
    To, CSeq number and top Via (so it matches the INVITE's branch)."""
    headers = Headers()
    headers.add("Via", invite.headers.get("Via") or "")
    headers.add("Max-Forwards", "70")
    headers.add("From", invite.headers.get("From") or "")
    headers.add("To", invite.headers.get("To") or "")
    headers.add("Call-ID", invite.call_id)
    headers.add("CSeq", f"{invite.cseq.number} CANCEL")
    headers.add("User-Agent", user_agent)
    return Request("CANCEL", invite.uri, headers)


def dialed_digits(request: Request) -> str | None:
    """The Request-URI user part as E.164 digits without '+' (guide §5), or None."""
    try:
        uri = parse_uri(request.uri)
    except ParseError:
        return None
    if isinstance(uri, SipUri):
        user = uri.user_unescaped
    else:
        user = getattr(uri, "number", None)
    if not user:
        return None
    user = user.split(";", 1)[0]
    digits = user[1:] if user.startswith("+") else user
    # Visual separators of RFC 3966 are allowed by dialers; nothing else.
    digits = digits.replace("-", "").replace(".", "").replace("(", "").replace(")", "")
    return digits if digits.isdigit() or digits in ("*", "#") else None


def user_of(uri_text: str) -> str | None:
    try:
        uri = parse_uri(uri_text)
    except ParseError:
        return None
    return uri.user if isinstance(uri, SipUri) else None


def contact_uri(message: Request | Response) -> str | None:
    value = message.headers.get("Contact")
    if value is None:
        return None
    try:
        contact = parse_contact(value)
    except ParseError:
        return None
    return None if contact == "*" else contact.uri


def without_tag(value: str) -> str:
    if value[:1] == "<" and value[-1:] == ">" and value.count("<") == 1 and value.count(">") == 1:
        # "<uri>" alone (SIPp's and most phones' To): no parameters, no
        # display name, so the parse below would give it back unchanged.
        return value
    try:
        name_addr = parse_name_addr(value)
    except ParseError:
        return value
    return str(
        attrs.evolve(
            name_addr, params=tuple((k, v) for k, v in name_addr.params if k.lower() != "tag")
        )
    )


def synthetic_response(request: Request, code: int, reason: str) -> Response:
    """A locally generated final response (a timeout becomes a 408, STYLE §5)."""
    headers = Headers()
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        value = request.headers.get(name)
        if value is not None:
            headers.add(name, value)
    return Response(code, reason, headers)
