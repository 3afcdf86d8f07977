"""Structured SIP header values: Via, CSeq, name-addr (From, To, Contact, Route),
parameters, and the header-name rules (compact forms, case).

Theory of operation: the message layer stores every header field raw, as
(name as received, value) text. The functions here turn one *value* into a
frozen object when someone asks for it; they never see the rest of the
message. Each keeps what was written (parameter names and values, the URI
text, the Via sent-by) so forwarding loses nothing, and offers lookups that
follow the RFC's case rules.

Implements RFC 3261 §7.3 (header syntax, comma-joined values, compact forms),
§20.10 (name-addr vs addr-spec), §20.16 (CSeq), §20.42 and §18.2.1 (Via),
RFC 3581 (rport). Errors are ``ParseError`` with status 400 whose reason names
the header ("Bad Via", "Bad From"); the message layer turns the status into
``None`` where the message cannot be answered.
"""

from __future__ import annotations

import re
from typing import Literal

import attrs

from ._errors import ParseError
from ._uri import AbsoluteUri, SipUri, TelUri, parse_uri

__all__ = [
    "COMPACT_FORMS",
    "KNOWN_METHODS",
    "CSeq",
    "NameAddr",
    "Via",
    "canonical_name",
    "parse_contact",
    "parse_cseq",
    "parse_name_addr",
    "parse_params",
    "parse_via",
    "split_header_values",
]

Params = tuple[tuple[str, str | None], ...]

COMPACT_FORMS: dict[str, str] = {
    # RFC 3261 §7.3.3 and §20
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    # RFC 3515 §2.1 (REFER)
    "r": "Refer-To",
    # RFC 3892 §3 (Referred-By)
    "b": "Referred-By",
    # RFC 6665 §8.2.1 / RFC 3265 §7.2.1 (events)
    "o": "Event",
    "u": "Allow-Events",
    # RFC 3841 §9.2 (caller preferences)
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
    # RFC 4028 §4 (session timers)
    "x": "Session-Expires",
    # RFC 4474 §9 (Identity; RFC 8224 keeps "y", obsoletes Identity-Info)
    "y": "Identity",
    "n": "Identity-Info",
}
"""Compact header name (lower-case) -> long form as the RFCs spell it."""

_COMPACT_LOWER = {k: v.lower() for k, v in COMPACT_FORMS.items()}

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"
_TOKEN = re.compile(rf"[{_TOKEN_CHARS}]+")
# A parameter value: token, host (IPv6 reference included), or quoted-string.
_PARAM = re.compile(
    rf"[ \t]*;[ \t]*([{_TOKEN_CHARS}]+)"
    rf"(?:[ \t]*=[ \t]*(\"(?:[^\"\\]|\\.)*\"|\[[0-9A-Fa-f:.]+\]|[{_TOKEN_CHARS}:]+))?[ \t]*",
    re.DOTALL,
)
_SIMPLE_PARAM = re.compile(rf"([{_TOKEN_CHARS}]+)(?:=([{_TOKEN_CHARS}:]+|\[[0-9A-Fa-f:.]+\]))?")
_VIA = re.compile(
    rf"([{_TOKEN_CHARS}]+)[ \t]*/[ \t]*([{_TOKEN_CHARS}]+)[ \t]*/[ \t]*([{_TOKEN_CHARS}]+)"
    r"[ \t]+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-_.]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*",
)
_PLAIN_PARAMS = (
    rf"(?:;[{_TOKEN_CHARS}]+(?:=(?:[{_TOKEN_CHARS}:]+|\[[0-9A-Fa-f:.]+\]|\"[^\"\\\\;\r\n]*\"))?)*"
)
# The fast paths' shapes: what stacks actually send, matched and captured by
# one regex call each, with at most three parameters whose names and values
# are tokens (;branch=..;rport;received=.., ;tag=.., ;lr). Anything else --
# LWS, quoted strings, IPv6 values, more parameters, errors -- takes the full
# grammar below, which gives the same result or says what is wrong.
# Quantifiers are possessive (``++``, ``?+``): each run stops at a character
# its class excludes, so giving some back could never lead to a match, and
# the engine keeps no backtracking state (a third of the cost of a match).
_P3 = rf"(?:;([{_TOKEN_CHARS}]++)(?:=([{_TOKEN_CHARS}]++))?+)?+" * 3
# ... and for name-addr, values may also be quoted strings without escapes
# (Contact's +sip.instance="<urn:uuid:...>").
_P3Q = rf'(?:;([{_TOKEN_CHARS}]++)(?:=([{_TOKEN_CHARS}]++|"[^"\\\r\n]*+"))?+)?+' * 3
# Groups: transport, sent-by as written, host, port, three parameters. A
# port with a leading zero takes the full grammar (sent_by writes the number).
_VIA_COMMON_TEXT = (
    r"SIP/2\.0/([A-Za-z]++) ((\[[0-9A-Fa-f:.]++\]|[A-Za-z0-9\-_.]++)(?::([1-9][0-9]{0,4}+))?+)"
    + _P3
)
_VIA_COMMON = re.compile(_VIA_COMMON_TEXT)
# URI characters in the fast paths: printable ASCII but SP " < > (and for an
# addr-spec also , ? ;). Listed as ranges, a bitmap test per character; the
# full grammar's [^\s<>"] (which also admits non-ASCII) costs a Unicode
# category look-up per character.
_URI_CHARS = r"[!#-;=?-~]"
_ADDR_SPEC_CHARS = r"[!#-+\--:=@-~]"
# After the '<': the URI, '>', parameters.
_ANGLE_URI_COMMON = re.compile(rf"([A-Za-z][A-Za-z0-9+\-.]*+:{_URI_CHARS}++)>" + _P3Q)
# addr-spec: the URI may not hold ',' '?' ';' (RFC 3261 §20.10).
_ADDR_SPEC_COMMON = re.compile(rf"([A-Za-z][A-Za-z0-9+\-.]*+:{_ADDR_SPEC_CHARS}++)" + _P3)
_URI_COMMON = re.compile(rf"[A-Za-z][A-Za-z0-9+\-.]*+:{_URI_CHARS}++")
"""A URI as every stack writes one (ASCII); anything it refuses still gets
the full grammar's judgement."""
# The From and To nearly every stack writes: ``<uri>`` or ``"name" <uri>``
# or a bare addr-spec, with a ``;tag`` or nothing. Groups: display name,
# URI, tag of the angle form; URI, tag of the addr-spec. One regex call and
# no parameter splitting; the message layer tries it before parse_name_addr,
# which gives the same result for every value it matches.
_FROM_TO_COMMON_TEXT = (
    rf'(?:"([^"\\\r\n]*+)" ?+)?+<([A-Za-z][A-Za-z0-9+\-.]*+:{_URI_CHARS}++)>'
    rf"(?:;tag=([{_TOKEN_CHARS}]++))?+"
    rf"|([A-Za-z][A-Za-z0-9+\-.]*+:{_ADDR_SPEC_CHARS}++)(?:;tag=([{_TOKEN_CHARS}]++))?+"
)
_FROM_TO_COMMON = re.compile(_FROM_TO_COMMON_TEXT)
# The top Via, From and To values joined by LF (which no header value
# holds): the three fast paths above in one regex call, for the message
# layer, which reads the three of every message. Groups: Via's ten, then
# From's five and To's five.
_VIA_FROM_TO_COMMON = re.compile(
    f"{_VIA_COMMON_TEXT}\n(?:{_FROM_TO_COMMON_TEXT})\n(?:{_FROM_TO_COMMON_TEXT})"
)
_TRANSPORTS = frozenset({"UDP", "TCP", "TLS", "SCTP", "WS", "WSS"})
# [display-name] <uri> params, with display-name quoted or a run of text.
_NAME_ADDR_PLAIN = re.compile(
    r'(?:"((?:[^"\\\r\n]|\\[^\r\n])*)"[ \t]*|([^"<]*?)[ \t]*)'
    r'<([A-Za-z][A-Za-z0-9+\-.]*:[^\s<>"]+)>'
    rf"[ \t]*({_PLAIN_PARAMS})"
)
_UNESCAPE_QUOTED = re.compile(r"\\(.)", re.DOTALL)
_URI_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:[^\s<>\"]+")
_CSEQ_MAX = 2**31 - 1  # RFC 3261 §8.1.1.5: "MUST be expressible as a 32-bit unsigned
# integer and MUST be less than 2**31"


def canonical_name(name: str) -> str:
    """The lower-case long form used for lookups: ``"v"`` and ``"VIA"`` give ``"via"``."""
    lname = name.lower()
    if len(lname) == 1:
        return _COMPACT_LOWER.get(lname, lname)
    return lname


def split_header_values(value: str) -> list[str]:
    """Split a comma-joined header value at top-level commas (RFC 3261 §7.3.1),
    not inside quoted strings or ``<>``. Items are stripped; empty items are
    kept (callers decide whether an empty element is an error)."""
    if "," not in value:
        return [value.strip(" \t")]
    if '"' not in value and "<" not in value:
        return [item.strip(" \t") for item in value.split(",")]
    out: list[str] = []
    start = 0
    in_quotes = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            out.append(value[start:i].strip(" \t"))
            start = i + 1
        i += 1
    out.append(value[start:].strip(" \t"))
    return out


def parse_params(text: str, *, what: str = "parameter") -> Params:
    """Parse ``;a=b ;c ;d="x y"`` (LWS allowed around ``;`` and ``=``) into
    (name, value) pairs, names as received, quoted values with their quotes.
    Raises ``ParseError("Bad <what>")`` on an empty or malformed parameter."""
    if not text.strip(" \t"):
        return ()
    if '"' not in text and " " not in text and "\t" not in text:
        # The common case (";branch=z9hG4bK..;rport"): one split, one match each.
        if text[0] != ";":
            raise ParseError(f"Bad {what}")
        out: list[tuple[str, str | None]] = []
        for item in text[1:].split(";"):
            m = _SIMPLE_PARAM.fullmatch(item)
            if m is None:
                raise ParseError(f"Bad {what}")
            out.append((m.group(1), m.group(2)))
        return tuple(out)
    pos = 0
    end = len(text)
    result: list[tuple[str, str | None]] = []
    while pos < end:
        m = _PARAM.match(text, pos)
        if m is None or m.end() == pos:
            raise ParseError(f"Bad {what}")
        result.append((m.group(1), m.group(2)))
        pos = m.end()
    return tuple(result)


def _lookup(params: Params, name: str) -> str | None:
    lname = name.lower()
    for key, value in params:
        if key == name or key.lower() == lname:
            return value
    return None


def _lookup_lower(params: Params, lname: str) -> str | None:
    """``_lookup`` for a lower-case name: no lower() unless the case differs."""
    for key, value in params:
        if key == lname or key.lower() == lname:
            return value
    return None


def _three_params(
    n1: str | None, v1: str | None, n2: str | None, v2: str | None, n3: str | None, v3: str | None
) -> Params:
    """The parameters a ``_P3`` group captured, in order."""
    if n1 is None:
        return ()
    if n2 is None:
        return ((n1, v1),)
    if n3 is None:
        return ((n1, v1), (n2, v2))
    return ((n1, v1), (n2, v2), (n3, v3))


def _has(params: Params, name: str) -> bool:
    # A loop rather than any() over a generator: asked of every request's Via
    # (has_rport), where the generator's frame cost more than the look-up.
    lname = name.lower()
    for key, _ in params:  # noqa: SIM110 (see above)
        if key == lname or key.lower() == lname:
            return True
    return False


def _replace_params(params: Params, updates: list[tuple[str, str | None]]) -> Params:
    out = list(params)
    for name, value in updates:
        lname = name.lower()
        for i, (key, _) in enumerate(out):
            if key.lower() == lname:
                out[i] = (key, value)
                break
        else:
            out.append((name, value))
    return tuple(out)


def _format_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def _to_int(value: str | None) -> int | None:
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return int(value)


# --------------------------------------------------------------------------- CSeq


# The parsed header values below are immutable by convention rather than by
# ``frozen=True``: attrs' frozen __init__ sets each field through
# object.__setattr__, which made building them a fifth of a message parse.
# They stay hashable (``unsafe_hash``) and equal by value; change one with
# ``with_params``/``attrs.evolve``, never by assignment.


@attrs.define(unsafe_hash=True)
class CSeq:
    """CSeq (RFC 3261 §20.16): sequence number and method. Immutable by convention."""

    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


KNOWN_METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
     "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH"}
)  # fmt: skip
"""Methods of RFC 3261 and its extensions: tokens the parser knows without a
regex check, and the methods the engine counts by name (any other counts as
"other", so a peer inventing method names cannot grow its tables)."""


def parse_cseq(value: str) -> CSeq:
    """Parse ``"<number> <method>"``; leading zeros allowed (RFC 4475 wsinv).

    Raises ``ParseError("Bad CSeq")`` when the number is not 0..2**31-1 or the
    method is not a token."""
    number, _, method = value.partition(" ")
    if not (number.isascii() and number.isdigit() and len(number) <= 10) or (
        method not in KNOWN_METHODS and not _TOKEN.fullmatch(method)
    ):
        # Not the "<digits> <METHOD>" every stack writes: extra LWS, or an error.
        parts = value.split()
        if len(parts) != 2:
            raise ParseError("Bad CSeq")
        number, method = parts
        if not (number.isascii() and number.isdigit()) or len(number) > 12:
            raise ParseError("Bad CSeq")
        if not _TOKEN.fullmatch(method):
            raise ParseError("Bad CSeq")
    n = int(number)
    if n > _CSEQ_MAX:
        raise ParseError("Bad CSeq")
    return CSeq(n, method)


# --------------------------------------------------------------------------- Via


@attrs.define(unsafe_hash=True)
class Via:
    """One Via value (RFC 3261 §20.42). ``host`` is an IPv6 literal without
    brackets where one was written; ``transport`` is upper-case. Immutable by
    convention: derive changed copies with ``with_params``."""

    protocol: str
    transport: str
    host: str
    port: int | None
    params: Params = ()
    _sent_by: str | None = attrs.field(default=None, init=False, eq=False, repr=False, hash=False)

    def param(self, name: str) -> str | None:
        """Value of the first parameter of that name (case-insensitive); None
        when absent or written without a value."""
        return _lookup(self.params, name)

    def has_param(self, name: str) -> bool:
        """Whether the parameter ``name`` is present (any case, with or without a value)."""
        return _has(self.params, name)

    @property
    def branch(self) -> str | None:
        """The ``branch`` parameter (RFC 3261 §8.1.1.7); None when absent."""
        for key, value in self.params:  # _lookup_lower, inline: read on every message
            if key == "branch" or key.lower() == "branch":
                return value
        return None

    @property
    def received(self) -> str | None:
        """The ``received`` parameter (RFC 3261 §18.2.1); None when absent."""
        return _lookup_lower(self.params, "received")

    @property
    def rport(self) -> int | None:
        """The rport value (RFC 3581 §4), None when absent or written bare."""
        return _to_int(_lookup_lower(self.params, "rport"))

    @property
    def has_rport(self) -> bool:
        """Whether the client asked for rport (RFC 3581 §3), with or without value."""
        return _has(self.params, "rport")

    @property
    def maddr(self) -> str | None:
        """The ``maddr`` parameter (RFC 3261 §18.2.2); None when absent."""
        return _lookup_lower(self.params, "maddr")

    @property
    def ttl(self) -> int | None:
        """The ``ttl`` parameter as an integer; None when absent or not a number."""
        return _to_int(_lookup_lower(self.params, "ttl"))

    @property
    def sent_by(self) -> str:
        """``host[:port]`` (IPv6 in brackets), as written in the Via."""
        sent_by = self._sent_by  # the parser's fast path keeps the text it matched
        if sent_by is None:
            host = self.host
            if ":" in host:
                host = f"[{host}]"  # format_host, inline: read on every message
            sent_by = self._sent_by = host if self.port is None else f"{host}:{self.port}"
        return sent_by

    def with_params(self, *pairs: tuple[str, str | None], **kwargs: str | None) -> Via:
        """A copy with parameters set: an existing one (case-insensitive) is
        replaced in place, a new one appended. ``None`` writes a bare flag
        (``;rport``)."""
        updates = list(pairs) + list(kwargs.items())
        return attrs.evolve(self, params=_replace_params(self.params, updates))

    def __str__(self) -> str:
        return f"{self.protocol}/{self.transport} {self.sent_by}{_format_params(self.params)}"


def _plain_params(text: str) -> Params:
    """Split ``;a=b;c`` already matched by a strict pattern (no LWS, no quotes)."""
    out: list[tuple[str, str | None]] = []
    for item in text[1:].split(";"):
        name, eq, value = item.partition("=")
        out.append((name, value if eq else None))
    return tuple(out)


def parse_via(value: str) -> Via:
    """Parse one Via value (already split at commas), LWS allowed anywhere the
    grammar allows it (RFC 4475 wsinv). Raises ``ParseError("Bad Via")``."""
    m = _VIA_COMMON.fullmatch(value)
    if m is not None:
        transport, sent_by, host, port_text, n1, v1, n2, v2, n3, v3 = m.groups()
        port = None
        if port_text is not None:
            port = int(port_text)
            if port > 65535:
                raise ParseError("Bad Via")
        if host[0] == "[":
            host = host[1:-1]
        if transport not in _TRANSPORTS:
            transport = transport.upper()
        via = Via("SIP/2.0", transport, host, port, _three_params(n1, v1, n2, v2, n3, v3))
        via._sent_by = sent_by
        return via
    m = _VIA.match(value)
    if m is None:
        raise ParseError("Bad Via")
    name, version, transport, host, port_text = m.groups()
    if host[0] == "[":
        host = host[1:-1]
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise ParseError("Bad Via")
    rest = value[m.end() :]
    params = parse_params(rest, what="Via") if rest else ()
    protocol = "SIP/2.0" if name == "SIP" and version == "2.0" else f"{name}/{version}"
    return Via(protocol, transport.upper(), host, port, params)


# --------------------------------------------------------------------------- name-addr


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote_at(text: str, start: int) -> tuple[str, int]:
    """Read the quoted-string starting at ``text[start] == '"'``; return its
    unescaped content and the index after the closing quote, or raise."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                break
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise ParseError("Unterminated quoted string")


_ANGLE_NEEDED = re.compile(r"[;,?]")


@attrs.define(unsafe_hash=True)
class NameAddr:
    """A name-addr or addr-spec with header parameters (From, To, Contact,
    Route, Record-Route, Refer-To ...). ``display_name`` is unquoted and
    unescaped (None when absent); ``uri`` is the URI text as written;
    ``params`` are the header parameters; ``angle`` records whether the URI
    was written between ``<`` and ``>``. Immutable by convention."""

    display_name: str | None
    uri: str
    params: Params = ()
    angle: bool = True
    _parsed: SipUri | TelUri | AbsoluteUri | None = attrs.field(
        default=None, init=False, eq=False, repr=False, hash=False
    )

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (From/To, RFC 3261 §19.3); None when absent."""
        for key, value in self.params:  # _lookup_lower, inline: read on every message
            if key == "tag" or key.lower() == "tag":
                return value
        return None

    def param(self, name: str) -> str | None:
        """Value of the first header parameter of that name (case-insensitive)."""
        return _lookup(self.params, name)

    def has_param(self, name: str) -> bool:
        """Whether the parameter ``name`` is present (any case, with or without a value)."""
        return _has(self.params, name)

    def with_tag(self, tag: str) -> NameAddr:
        """A copy with ``;tag=`` set (replacing any tag)."""
        return self.with_params(("tag", tag))

    def with_params(self, *pairs: tuple[str, str | None], **kwargs: str | None) -> NameAddr:
        """A copy with header parameters set or replaced (see ``Via.with_params``)."""
        updates = list(pairs) + list(kwargs.items())
        return NameAddr(
            self.display_name, self.uri, _replace_params(self.params, updates), self.angle
        )

    @property
    def parsed_uri(self) -> SipUri | TelUri | AbsoluteUri:
        """The URI parsed (cached); raises ``ParseError`` ("Bad URI ...")."""
        parsed = self._parsed
        if parsed is None:
            parsed = parse_uri(self.uri)
            self._parsed = parsed
        return parsed

    def __str__(self) -> str:
        params = _format_params(self.params)
        if self.display_name is None:
            if self.angle or _ANGLE_NEEDED.search(self.uri):
                return f"<{self.uri}>{params}"
            return f"{self.uri}{params}"
        name = self.display_name
        words = name.split(" ")
        if not name or not all(_TOKEN.fullmatch(w) for w in words):
            name = _quote(name)
        return f"{name} <{self.uri}>{params}"


def parse_name_addr(value: str, *, header: str = "name-addr") -> NameAddr:
    """Parse ``[display-name] <uri> *(;param)`` or ``uri *(;param)``.

    In the addr-spec form (no ``<>``) every ``;`` starts a header parameter
    (RFC 3261 §20.10), and the URI may not hold ``,`` ``?`` or ``;``
    (RFC 4475 §3.1.2.13 regbadct). No whitespace is allowed inside ``<>``
    (§3.1.2.14 badaspec). Unquoted display names are accepted as any text
    without quotes or ``<`` (softphones write UTF-8 names unquoted); they
    are kept with runs of whitespace collapsed to one SP (§25.1: tokens
    separated by LWS). Raises ``ParseError("Bad <header>")``."""
    display, lt, rest = value.partition("<")
    if not lt:
        m = _ADDR_SPEC_COMMON.fullmatch(value)
        if m is not None:
            uri, n1, v1, n2, v2, n3, v3 = m.groups()
            return NameAddr(None, uri, _three_params(n1, v1, n2, v2, n3, v3), False)
        return _parse_name_addr_general(value, header)
    m = _ANGLE_URI_COMMON.fullmatch(rest)
    if m is not None:
        uri, n1, v1, n2, v2, n3, v3 = m.groups()
        if not display:  # _three_params, inline: a REGISTER's Contact is parsed at once
            if n1 is None:
                return NameAddr(None, uri, ())
            if n2 is None:
                return NameAddr(None, uri, ((n1, v1),))
            if n3 is None:
                return NameAddr(None, uri, ((n1, v1), (n2, v2)))
            return NameAddr(None, uri, ((n1, v1), (n2, v2), (n3, v3)))
        if display[0] == '"':
            close = display.find('"', 1)
            if close > 0 and "\\" not in display and not display[close + 1 :].strip(" \t"):
                params = _three_params(n1, v1, n2, v2, n3, v3)
                return NameAddr(display[1:close], uri, params)
        elif '"' not in display:
            params = _three_params(n1, v1, n2, v2, n3, v3)
            return NameAddr(" ".join(display.split()) or None, uri, params)
    m = _NAME_ADDR_PLAIN.fullmatch(value)
    if m is not None:
        # Escaped display names, quoted parameter values (+sip.instance="<urn:..>").
        quoted, text, uri, params_text = m.groups()
        display_name: str | None = None
        if quoted is not None:
            display_name = _UNESCAPE_QUOTED.sub(r"\1", quoted) if "\\" in quoted else quoted
        elif text:
            display_name = " ".join(text.split()) or None
        return NameAddr(display_name, uri, _plain_params(params_text) if params_text else ())
    return _parse_name_addr_general(value, header)


def _parse_name_addr_general(value: str, header: str) -> NameAddr:
    v = value.strip(" \t")
    if not v:
        raise ParseError(f"Bad {header}")
    display: str | None = None
    if v[0] == '"':
        try:
            display, after = _unquote_at(v, 0)
        except ParseError:
            raise ParseError(f"Bad {header}: unterminated quote") from None
        lt = after
        while lt < len(v) and v[lt] in " \t":
            lt += 1
        if lt >= len(v) or v[lt] != "<":
            raise ParseError(f"Bad {header}")
    else:
        lt = v.find("<")
        if lt < 0:
            semi = v.find(";")
            uri = v if semi < 0 else v[:semi].rstrip(" \t")
            if not _URI_SHAPE.fullmatch(uri) or "," in uri or "?" in uri:
                raise ParseError(f"Bad {header}")
            params = parse_params(v[semi:], what=header) if semi >= 0 else ()
            return NameAddr(None, uri, params, False)
        if lt:
            text = v[:lt]
            if '"' in text:
                raise ParseError(f"Bad {header}")
            display = " ".join(text.split()) or None
    gt = v.find(">", lt)
    if gt < 0:
        raise ParseError(f"Bad {header}")
    uri = v[lt + 1 : gt]
    if not _URI_SHAPE.fullmatch(uri):
        raise ParseError(f"Bad {header}")
    rest = v[gt + 1 :]
    params = parse_params(rest, what=header) if rest else ()
    return NameAddr(display, uri, params, True)


def parse_contact(value: str) -> NameAddr | Literal["*"]:
    """One Contact value (already split): a name-addr/addr-spec, or ``"*"``
    (the REGISTER wildcard, RFC 3261 §10.2.2). ``expires``, ``q`` and other
    contact parameters are read with ``.param(...)``."""
    if "*" in value and value.strip(" \t") == "*":
        return "*"
    return parse_name_addr(value, header="Contact")
