"""SDP bodies: parsing, serialisation and the offer/answer policy of kx-sipd.

What this module owns: the SDP syntax of RFC 8866 (formerly RFC 4566) as a
faithful model (every line kept, in order, so serialise(parse(x)) reproduces
x), and the policy a G.711-only B2BUA applies under RFC 3264:

* ``filter_offer``: keep one audio stream, RTP/AVP, with PCMU (0), PCMA (8)
  and telephone-event/8000 (RFC 4733) only; refuse everything else with 488.
* ``make_answer``: turn the other leg's answer into the answer for the
  offerer, with one m= line per offered stream (RFC 3264 §6), refused ones
  at port 0.
* ``rewrite_media``: put the relay's address and port in c= and m=, drop
  what a relay in the middle invalidates (ICE, rtcp, rtcp-mux).

What it refuses to know: sockets, the relay, dialogs. Payload type numbers
are never rewritten: the offer goes to the other leg with the offerer's
numbers, and the answer comes back with the same numbers, so telephone-event
keeps one number end to end (DESIGN §7, "never mix the two").

Parsing is tolerant where softphones are sloppy (LF-only line ends, trailing
white space, blank lines, a missing s= or t=) and strict where structure is
at stake (v= first, o= present and well formed, m= and c= well formed).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

import attrs

from ._errors import ParseError, RemoteProtocolError

__all__ = [
    "Media",
    "NoAcceptableCodec",
    "Origin",
    "SessionDescription",
    "audio_formats",
    "codec_name",
    "filter_offer",
    "make_answer",
    "media_address",
    "parse_sdp",
    "rewrite_media",
    "serialize_sdp",
    "telephone_event",
    "without_endpoint_features",
]

Line = tuple[str, str]
"""One SDP line as (type, value): ``("a", "rtpmap:0 PCMU/8000")``."""

# RFC 3551 §6 Table 4: static audio payload types, (encoding, clock, channels).
_STATIC_AUDIO: dict[str, tuple[str, int, int]] = {
    "0": ("PCMU", 8000, 1),
    "3": ("GSM", 8000, 1),
    "4": ("G723", 8000, 1),
    "5": ("DVI4", 8000, 1),
    "6": ("DVI4", 16000, 1),
    "7": ("LPC", 8000, 1),
    "8": ("PCMA", 8000, 1),
    "9": ("G722", 8000, 1),
    "10": ("L16", 44100, 2),
    "11": ("L16", 44100, 1),
    "12": ("QCELP", 8000, 1),
    "13": ("CN", 8000, 1),
    "14": ("MPA", 90000, 1),
    "15": ("G728", 8000, 1),
    "16": ("DVI4", 11025, 1),
    "17": ("DVI4", 22050, 1),
    "18": ("G729", 8000, 1),
}

_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HT (RFC 8866 §9 text)
# A body none of whose lines can hold a control character: no CTL but HT, CR
# and LF, and every CR at a line end (where the line's trailing white space is
# cut). The usual body; then no line needs its own search.
_ANY_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_G711 = ("PCMU", "PCMA")
_RTP_AVP = "RTP/AVP"

# Format-specific attributes: "a=<name>:<pt> ..." belongs to payload type pt.
_PER_FORMAT = frozenset({"rtpmap", "fmtp", "rtcp-fb"})
# SRTP and DTLS keying: the guide says no SRTP, so an offer keeps none of it
# (MicroSIP 3.19 offers SDES crypto inside RTP/AVP: "best effort" SRTP).
_SECURITY = frozenset({"crypto", "fingerprint", "setup", "key-mgmt"})
# ICE and RTCP placement: addresses of the offerer, meaningless once the
# relay sits in the middle (RFC 8445 §B.2, RFC 3605).
_RELAY_INVALIDATES = frozenset(
    {
        "candidate",
        "remote-candidates",
        "end-of-candidates",
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "ice-pacing",
        "rtcp",
        "rtcp-mux",
        "rtcp-rsize",
        # Endpoint identity (RFC 5576 source attributes carry a CNAME such as
        # the customer's SIP URI; RFC 8830 msid; the software's name): a B2BUA
        # does not tell one leg who is on the other.
        "ssrc",
        "ssrc-group",
        "msid",
        "msid-semantic",
        "tool",
    }
)
# RTP extensions an endpoint announces for itself (RFC 3611 XR, RFC 4585
# feedback, RFC 8285 header extensions): kx-sipd's own echo answer must not
# claim them.
_ENDPOINT_FEATURES = frozenset({"rtcp-xr", "rtcp-fb", "extmap", "extmap-allow-mixed"})


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def _bad(detail: str) -> ParseError:
    return ParseError(f"Bad SDP: {detail}")


def _attribute(value: str) -> tuple[str, str | None]:
    name, sep, rest = value.partition(":")
    return (name, rest if sep else None)


def _connection_address(value: str) -> str:
    """The address of a c= value "IN IP4 192.0.2.1/127" → "192.0.2.1"."""
    return value.split()[2].split("/")[0]


def _unspecified(address: str) -> bool:
    """0.0.0.0 (RFC 2543 hold, RFC 3264 §8.4) or the IPv6 unspecified address."""
    if ":" not in address:
        # The one IPv4 form ipaddress reads as unspecified (it refuses
        # leading zeros); a name or anything else is not.
        return address == "0.0.0.0"
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


@attrs.frozen(kw_only=True)
class Origin:
    """The o= line's fields (RFC 8866 §5.2)."""

    username: str
    session_id: str
    session_version: str
    nettype: str
    addrtype: str
    address: str

    def __str__(self) -> str:
        return " ".join(
            (
                self.username,
                self.session_id,
                self.session_version,
                self.nettype,
                self.addrtype,
                self.address,
            )
        )


@attrs.frozen(kw_only=True)
class Media:
    """One media description: the m= line's fields and every following line.

    ``lines`` are the lines after m= (i=, c=, b=, k=, a=) in received order;
    ``connection``, ``attributes`` and ``other`` are views on them.
    """

    media: str
    port: int
    port_count: int | None = None
    proto: str
    formats: tuple[str, ...]
    lines: tuple[Line, ...] = ()
    # Payload type -> its mapping (``rtpmap``'s answer), filled on first use:
    # the offer/answer policy asks for every format several times.
    _rtpmaps: dict[str, tuple[str, int, int | None] | None] | None = attrs.field(
        default=None, init=False, eq=False, repr=False, hash=False
    )

    @property
    def m_line(self) -> str:
        """The m= line's value: "media port[/count] proto formats..." (RFC 4566 §5.14)."""
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        return " ".join((self.media, port, self.proto, *self.formats))

    @property
    def connection(self) -> str | None:
        """The media-level c= value, or None (then the session's applies)."""
        for kind, value in self.lines:
            if kind == "c":
                return value
        return None

    @property
    def attributes(self) -> tuple[tuple[str, str | None], ...]:
        """The a= lines as (name, value); value None for a flag such as ``sendonly``."""
        return tuple(_attribute(value) for kind, value in self.lines if kind == "a")

    @property
    def other(self) -> tuple[Line, ...]:
        """The i=, b= and k= lines (and any unknown type), in order."""
        return tuple(line for line in self.lines if line[0] not in ("a", "c"))

    @property
    def direction(self) -> str:
        """The media-level direction attribute, "sendrecv" when absent (RFC 3264 §5.1)."""
        return _direction(self.lines) or "sendrecv"

    def rtpmap(self, pt: str) -> tuple[str, int, int | None] | None:
        """(encoding, clock rate, channels) of payload type ``pt``: from its
        a=rtpmap, else from the static table of RFC 3551, else None. Channels
        is None when the rtpmap does not say (it means 1 for audio)."""
        rtpmaps = self._rtpmaps
        if rtpmaps is None:
            rtpmaps = {}
            for kind, value in self.lines:
                if kind == "a" and value.startswith("rtpmap:"):
                    number, space, mapping = value[7:].partition(" ")
                    if space and number not in rtpmaps:
                        rtpmaps[number] = _parse_rtpmap(mapping)
            object.__setattr__(self, "_rtpmaps", rtpmaps)
        if pt in rtpmaps:
            return rtpmaps[pt]
        return _STATIC_AUDIO.get(pt) if self.media == "audio" else None


def _parse_rtpmap(text: str) -> tuple[str, int, int | None] | None:
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not parts[0]:
        return None
    if not _is_number(parts[1]) or (len(parts) == 3 and not _is_number(parts[2])):
        return None
    channels = int(parts[2]) if len(parts) == 3 else None
    return (parts[0], int(parts[1]), channels)


def _direction(lines: Iterable[Line]) -> str | None:
    found = None
    for kind, value in lines:
        if kind == "a" and value in _DIRECTIONS:
            found = value
    return found


@attrs.frozen(kw_only=True)
class SessionDescription:
    """A session description: the session-level lines (v= to the first m=,
    verbatim and in order) and the media descriptions."""

    lines: tuple[Line, ...]
    media: tuple[Media, ...] = ()

    @property
    def version(self) -> str:
        """The v= value ("0" when the line is missing)."""
        return self._first("v") or "0"

    @property
    def origin(self) -> Origin:
        """The o= line parsed (RFC 4566 §5.2); ParseError when missing or malformed."""
        value = self._first("o")
        if value is None:
            raise _bad("missing o= line")
        return _parse_origin(value)

    @property
    def session_name(self) -> str | None:
        """The s= value; None when the line is missing."""
        return self._first("s")

    @property
    def connection(self) -> str | None:
        """The session-level c= value, or None."""
        return self._first("c")

    @property
    def direction(self) -> str | None:
        """The session-level direction attribute, if any."""
        return _direction(self.lines)

    def _first(self, kind: str) -> str | None:
        for k, value in self.lines:
            if k == kind:
                return value
        return None

    def __bytes__(self) -> bytes:
        return serialize_sdp(self)


def _origin_fields(value: str) -> list[str]:
    fields = value.split()
    if len(fields) != 6:
        raise _bad("malformed o= line")
    return fields


def _parse_origin(value: str) -> Origin:
    fields = _origin_fields(value)
    return Origin(
        username=fields[0],
        session_id=fields[1],
        session_version=fields[2],
        nettype=fields[3],
        addrtype=fields[4],
        address=fields[5],
    )


def _check_connection(value: str) -> None:
    fields = value.split()
    if len(fields) != 3 or not fields[2]:
        raise _bad("malformed c= line")


def _parse_port(text: str) -> tuple[int, int | None]:
    port_text, slash, count_text = text.partition("/")
    if not _is_number(port_text) or len(port_text) > 5 or int(port_text) > 65535:
        raise _bad("bad m= port")
    count = None
    if slash:
        if not _is_number(count_text) or len(count_text) > 5 or int(count_text) == 0:
            raise _bad("bad m= port count")
        count = int(count_text)
    return int(port_text), count


def _parse_m(value: str) -> tuple[str, int, int | None, str, tuple[str, ...]]:
    """The m= line's fields: (media, port, port count, proto, formats)."""
    fields = value.split()
    if len(fields) < 4:
        raise _bad("malformed m= line")
    port, count = _parse_port(fields[1])
    return fields[0], port, count, fields[2], tuple(fields[3:])


def _media(m_fields: tuple[str, int, int | None, str, tuple[str, ...]], lines: list[Line]) -> Media:
    media, port, count, proto, formats = m_fields
    return Media(
        media=media, port=port, port_count=count, proto=proto, formats=formats, lines=tuple(lines)
    )


def parse_sdp(body: bytes) -> SessionDescription:
    """Parse an SDP body (RFC 8866 §5).

    Raises ``ParseError("Bad SDP: <detail>", 400)`` for a body that is not
    UTF-8, does not start with ``v=0``, has a line that is not
    ``<letter>=<value>``, lacks a well-formed o= line, or has a malformed
    m= or c= line. Tolerates LF-only line ends, trailing white space and
    blank lines, which softphones produce.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad("not UTF-8") from exc
    session: list[Line] = []
    media: list[Media] = []
    current: tuple[str, int, int | None, str, tuple[str, ...]] | None = None
    current_lines: list[Line] = []
    search_lines = _ANY_CONTROL.search(text) is not None
    for raw in text.split("\n"):
        line = raw.rstrip(" \t\r")
        if not line:
            continue
        if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
            raise _bad("malformed line")
        kind, value = line[0], line[2:]
        if search_lines and _CONTROL.search(value):
            raise _bad("control character")
        if not session and (kind != "v" or value.strip() != "0"):
            raise _bad("must start with v=0")
        if kind == "c":
            _check_connection(value)
        if kind == "m":
            if current is not None:
                media.append(_media(current, current_lines))
            current = _parse_m(value)
            current_lines = []
        elif current is None:
            session.append((kind, value))
        else:
            current_lines.append((kind, value))
    if current is not None:
        media.append(_media(current, current_lines))
    if not session:
        raise _bad("empty body")
    origins = [value for kind, value in session if kind == "o"]
    if not origins:
        raise _bad("missing o= line")
    _parse_origin(origins[0])
    return SessionDescription(lines=tuple(session), media=tuple(media))


def serialize_sdp(sd: SessionDescription) -> bytes:
    """The body, CRLF line ends (RFC 8866 §5), lines in model order."""
    out: list[str] = [f"{kind}={value}\r\n" for kind, value in sd.lines]
    for m in sd.media:
        out.append(f"m={m.m_line}\r\n")
        out.extend(f"{kind}={value}\r\n" for kind, value in m.lines)
    return "".join(out).encode("utf-8")


# -- offer/answer policy ----------------------------------------------------


class NoAcceptableCodec(RemoteProtocolError):
    """No stream of the offer can be carried: 488 Not Acceptable Here with a
    Warning (RFC 3261 §21.4.26, §20.43). ``warning_code`` is 305
    "Incompatible media format" (no G.711), 304 "Media type not available"
    (no audio stream) or 302 "Incompatible transport protocol" (G.711 only
    over SRTP: the guide says TLS/SRTP are not supported)."""

    def __init__(
        self, warning_code: int = 305, warning_text: str = "Incompatible media format"
    ) -> None:
        warning = f'{warning_code} kx-sipd "{warning_text}"'
        super().__init__("Not Acceptable Here", 488, (("Warning", warning),))
        self.warning_code = warning_code


def _accepted_formats(m: Media) -> tuple[str, ...]:
    """The formats of ``m`` kx-sipd carries, in the offerer's order:
    PCMU/8000 and PCMA/8000 (mono), and telephone-event/8000 (RFC 4733 §7.1.1;
    G.711 is 8 kHz, so events at 16000 or 48000 would need another clock)."""
    kept: list[str] = []
    for pt in m.formats:
        mapping = m.rtpmap(pt)
        if mapping is None:
            continue
        encoding, clock, channels = mapping
        if clock != 8000 or channels not in (None, 1):
            continue
        if encoding.upper() in _G711 or encoding.lower() == "telephone-event":
            kept.append(pt)
    return tuple(kept)


def _codec_key(m: Media, pt: str) -> tuple[str, int] | None:
    """(ENCODING, clock rate) of payload type ``pt`` in ``m``, or None."""
    mapping = m.rtpmap(pt)
    return None if mapping is None else (mapping[0].upper(), mapping[1])


def _is_dynamic(pt: str) -> bool:
    """RFC 3551 §6: payload types 96-127 are dynamic."""
    return pt.isascii() and pt.isdigit() and 96 <= int(pt) <= 127


def _has_g711(m: Media, formats: Iterable[str]) -> bool:
    for pt in formats:
        mapping = m.rtpmap(pt)
        if mapping is not None and mapping[0].upper() in _G711:
            return True
    return False


def _usable(m: Media) -> bool:
    return (
        m.media == "audio"
        and m.port != 0
        and m.proto.upper() == _RTP_AVP
        and _has_g711(m, _accepted_formats(m))
    )


def _chosen_stream(sd: SessionDescription) -> int:
    """Index of the one m= line kx-sipd carries: the first usable audio
    stream (the relay holds one port pair per side). Raises NoAcceptableCodec."""
    for index, m in enumerate(sd.media):
        if _usable(m):
            return index
    audio = [m for m in sd.media if m.media == "audio" and m.port != 0]
    if not audio:
        raise NoAcceptableCodec(304, "Media type not available")
    if any(_has_g711(m, _accepted_formats(m)) for m in audio):
        raise NoAcceptableCodec(302, "Incompatible transport protocol")
    raise NoAcceptableCodec(305, "Incompatible media format")


def _keep_formats(m: Media, keep: tuple[str, ...]) -> Media:
    """``m`` with only the formats ``keep``, their per-format attributes, and
    every other line except SRTP/DTLS keying and k=."""
    keep_set = set(keep)
    lines: list[Line] = []
    for kind, value in m.lines:
        if kind == "k":  # RFC 8866 §5.12: obsolete key field, "MUST NOT be used"
            continue
        if kind == "a":
            name, rest = _attribute(value)
            if name in _SECURITY:
                continue
            if name in _PER_FORMAT and rest is not None:
                pt = rest.split(" ", 1)[0]
                if pt != "*" and pt not in keep_set:
                    continue
        lines.append((kind, value))
    return Media(
        media=m.media,
        port=m.port,
        port_count=m.port_count,
        proto=m.proto,
        formats=keep,
        lines=tuple(lines),
    )


def filter_offer(sd: SessionDescription) -> SessionDescription:
    """The offer to forward to the other leg.

    Keeps the first audio stream that is RTP/AVP and offers PCMU or PCMA,
    with only PCMU, PCMA and telephone-event/8000, their rtpmap/fmtp/rtcp-fb
    lines, and every other attribute (ptime, maxptime, direction, ...)
    except SRTP/DTLS keying and k= lines. Every other m= line is left out
    (video, further audio streams): ``make_answer`` puts them back at port 0
    for the offerer, as RFC 3264 §6 requires. Session-level keying and
    BUNDLE grouping go too. Raises ``NoAcceptableCodec`` (488) when no
    stream is usable.
    """
    index = _chosen_stream(sd)
    chosen = sd.media[index]
    session = tuple(
        (kind, value)
        for kind, value in sd.lines
        if kind != "k" and not (kind == "a" and _session_attribute_dropped(value))
    )
    return SessionDescription(
        lines=session, media=(_keep_formats(chosen, _accepted_formats(chosen)),)
    )


def _session_attribute_dropped(value: str) -> bool:
    name, rest = _attribute(value)
    if name in _SECURITY:
        return True
    # a=group:BUNDLE names mids of streams that may have been left out.
    return name == "group" and rest is not None and rest.upper().startswith("BUNDLE")


def make_answer(offer: SessionDescription, answer: SessionDescription) -> SessionDescription:
    """The answer for the offerer, built from the other leg's ``answer`` to
    ``filter_offer(offer)``.

    Session-level lines come from ``answer``. The m= lines follow ``offer``
    one for one (RFC 3264 §6): the carried stream is the answer's first m=
    line, its formats cut to those offered (a peer answering with a format
    it was not offered is ignored on that format); every other offered
    stream is refused with port 0 and its first format (RFC 3264 §6: "Any
    media formats listed are ignored. At least one MUST be present"). The
    address and port are still the other leg's: apply ``rewrite_media``.
    Raises ``NoAcceptableCodec`` when ``offer`` has no usable stream, or
    when the answer refused the stream or left no G.711 in it.
    """
    index = _chosen_stream(offer)
    offered = offer.media[index]
    offered_formats = _accepted_formats(offered)
    if not answer.media or answer.media[0].port == 0:
        raise NoAcceptableCodec(305, "Incompatible media format")
    carried = answer.media[0]
    # A dynamic payload type matches by encoding and clock rate, keeping the
    # answerer's number: RFC 3264 §6.1 only says the answerer SHOULD reuse the
    # offer's number, and a carrier that answers telephone-event as 101 to an
    # offer of 96 still agrees to DTMF. Each side then sends the number the
    # other asked for (DESIGN §7: numbers pass through unchanged, per leg).
    offered_codecs = {_codec_key(offered, pt) for pt in offered_formats}
    keep = tuple(
        pt
        for pt in carried.formats
        if pt in offered_formats
        or (_is_dynamic(pt) and _codec_key(carried, pt) in offered_codecs - {None})
    )
    # Judge by the offer's mappings: the answer uses the offer's numbers
    # (RFC 3264 §6.1) and may omit an rtpmap the offer already gave.
    if not _has_g711(offered, keep):
        raise NoAcceptableCodec(305, "Incompatible media format")
    carried = _keep_formats(carried, keep)
    streams: list[Media] = []
    for position, m in enumerate(offer.media):
        if position == index:
            streams.append(carried)
        else:
            streams.append(
                Media(
                    media=m.media,
                    port=0,
                    port_count=None,
                    proto=m.proto,
                    formats=m.formats[:1],
                )
            )
    return SessionDescription(lines=answer.lines, media=tuple(streams))


@functools.lru_cache(maxsize=256)
def _c_value(address: str) -> str:
    try:
        family = "IP6" if ipaddress.ip_address(address).version == 6 else "IP4"
    except ValueError as exc:
        raise ValueError(f"not an IP address: {address!r}") from exc
    return f"IN {family} {address}"


def _active_audio(sd: SessionDescription) -> int | None:
    for index, m in enumerate(sd.media):
        if m.media == "audio" and m.port != 0:
            return index
    return None


def _effective_connection(sd: SessionDescription, m: Media) -> str | None:
    value = m.connection or sd.connection
    return _connection_address(value) if value is not None else None


def rewrite_media(
    sd: SessionDescription,
    *,
    address: str,
    port: int,
    bump_version: bool = False,
    origin_user: str | None = None,
) -> SessionDescription:
    """``sd`` as the relay presents it: c= (session and media level) and the
    o= address set to ``address`` (IN IP4 or IN IP6 by its form), the active
    audio stream's m= port set to ``port``, and ICE, a=rtcp, a=rtcp-mux
    dropped (RTCP then goes to port + 1, where the relay listens).

    A stream on hold the RFC 2543 way (c= 0.0.0.0, RFC 3264 §8.4) keeps
    0.0.0.0 so the hold survives the relay. ``bump_version`` increments the
    o= session version (RFC 3264 §8: a changed description in a re-offer);
    ``origin_user`` replaces the o= username. Raises ValueError when
    ``address`` is not an IP literal or ``port`` is out of range.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    c_value = _c_value(address)
    active = _active_audio(sd)
    session_held = sd.connection is not None and _unspecified(_connection_address(sd.connection))
    origin_value = sd._first("o")
    if origin_value is None:
        raise _bad("missing o= line")
    username, session_id, version, nettype, _, _ = _origin_fields(origin_value)
    if bump_version and _is_number(version):
        version = str(int(version) + 1)
    new_origin = " ".join(
        (
            origin_user if origin_user is not None else username,
            session_id,
            version,
            nettype,
            c_value.split()[1],
            address,
        )
    )
    session: list[Line] = []
    for kind, value in sd.lines:
        if kind == "o":
            session.append(("o", new_origin))
        elif kind == "c":
            session.append(("c", value if session_held else c_value))
        elif kind == "a" and _attribute(value)[0] in _RELAY_INVALIDATES:
            continue
        else:
            session.append((kind, value))
    media: list[Media] = []
    for index, m in enumerate(sd.media):
        lines: list[Line] = []
        for kind, value in m.lines:
            if kind == "c":
                lines.append(("c", value if _unspecified(_connection_address(value)) else c_value))
            elif kind == "a" and _attribute(value)[0] in _RELAY_INVALIDATES:
                continue
            else:
                lines.append((kind, value))
        media.append(
            Media(
                media=m.media,
                port=port if index == active else m.port,
                port_count=m.port_count,
                proto=m.proto,
                formats=m.formats,
                lines=tuple(lines),
            )
        )
    return SessionDescription(lines=tuple(session), media=tuple(media))


def telephone_event(sd: SessionDescription) -> int | None:
    """The payload type of RFC 4733 telephone-event/8000 in the first active
    audio stream, or None."""
    index = _active_audio(sd)
    if index is None:
        return None
    m = sd.media[index]
    for pt in m.formats:
        if _is_dynamic(pt) and _codec_key(m, pt) == ("TELEPHONE-EVENT", 8000):
            return int(pt)
    return None


def without_endpoint_features(sd: SessionDescription) -> SessionDescription:
    """``sd`` without the RTP extensions an endpoint announces for itself
    (RTCP-XR, RTCP feedback, header extensions): for an answer kx-sipd gives
    in its own name, such as the echo test's."""

    def keep(line: Line) -> bool:
        return not (line[0] == "a" and _attribute(line[1])[0] in _ENDPOINT_FEATURES)

    return SessionDescription(
        lines=tuple(line for line in sd.lines if keep(line)),
        media=tuple(attrs.evolve(m, lines=tuple(x for x in m.lines if keep(x))) for m in sd.media),
    )


def media_address(sd: SessionDescription) -> tuple[str, int] | None:
    """(address, port) of the first active audio stream: where its RTP comes
    from, for the relay's expected peer. None when there is none, or when it
    is on hold with c=0.0.0.0 (no address to expect)."""
    index = _active_audio(sd)
    if index is None:
        return None
    m = sd.media[index]
    address = _effective_connection(sd, m)
    if address is None or _unspecified(address):
        return None
    return (address, m.port)


def audio_formats(sd: SessionDescription) -> tuple[tuple[str, str, int], ...]:
    """(payload type, encoding, clock) of each format of the first active
    audio stream whose mapping is known, in the stream's order."""
    index = _active_audio(sd)
    if index is None:
        return ()
    m = sd.media[index]
    out: list[tuple[str, str, int]] = []
    for pt in m.formats:
        mapping = m.rtpmap(pt)
        if mapping is not None:
            out.append((pt, mapping[0], mapping[1]))
    return tuple(out)


def codec_name(sd: SessionDescription) -> str | None:
    """The first voice codec of the first active audio stream, upper-case
    ("PCMA"), for call records; telephone-event and comfort noise are not
    voice. None when there is none."""
    for _, encoding, _clock in audio_formats(sd):
        if encoding.lower() not in ("telephone-event", "cn"):
            return encoding.upper()
    return None
