"""SIP messages: parse a datagram into a Request or Response, serialise back.

Theory of operation. The parser does the least work that still lets it
refuse what RFC 4475 says must be refused: it splits the header block into
lines once, keeps every field raw as (name as received, value) in order, and
builds a lower-case-long-name -> positions index as it goes. It then parses the
few headers every element needs (Via, From, To, Call-ID, CSeq, Contact,
Content-Length, Date when present) and caches the results in the ``Headers``
object, so the engine's later reads are dictionary look-ups. Everything else
stays text until someone asks. Mutating the headers drops the cache.

What it refuses, and how (RFC 3261 §7, §18.3, §20; RFC 4475 §3.1.2, §3.3):
* a request line with extra or trailing spaces, or a Request-URI in ``<>``
  -> 400; a version other than SIP/2.0 in a request -> 505;
* a missing or unparseable Via, From, To, Call-ID or CSeq, a CSeq method
  different from the request method, a malformed Contact or Date -> 400
  naming the header ("Missing Call-ID", "Bad Contact");
* Content-Length larger than the datagram's body, or conflicting duplicates
  -> 400; a message over ``max_size`` -> 513;
* header text that is not UTF-8 -> 400 "Invalid UTF-8".
Faults in a response, in an ACK, or in bytes that are not recognisably a SIP
request are raised with ``status_code=None``: they cannot be answered and
the engine drops and counts them.

Datagram framing (§18.3): a Content-Length shorter than what follows the
header block truncates the body; bytes after the body are discarded (RFC 4475
dblreq); without Content-Length the body is the rest of the datagram. Stream
framing lives in ``_framing``.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from ._errors import ParseError
from ._headers import (
    _COMPACT_LOWER,
    _TOKEN,
    CSeq,
    NameAddr,
    Via,
    canonical_name,
    parse_contact,
    parse_cseq,
    parse_name_addr,
    parse_via,
    split_header_values,
)

__all__ = [
    "Headers",
    "Request",
    "Response",
    "is_keepalive",
    "make_response",
    "parse_message",
]

# Header names as softphones and carriers usually spell them -> lookup key
# (lower-case long form). A read-only table that spares the common case a
# lower() call and a token check; other spellings go through canonical_name.
_KNOWN_NAMES: dict[str, str] = {}
for _long in (
    "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Max-Forwards", "Content-Length",
    "Content-Type", "Route", "Record-Route", "Authorization", "WWW-Authenticate",
    "Proxy-Authorization", "Proxy-Authenticate", "User-Agent", "Server", "Allow", "Supported",
    "Require", "Proxy-Require", "Unsupported", "Expires", "Accept", "Date", "Subject",
    "Session-Expires", "Min-SE", "Event", "Allow-Events", "Content-Disposition",
    "Content-Encoding", "Organization", "Timestamp", "Retry-After", "Reason", "Privacy",
    "P-Asserted-Identity", "P-Preferred-Identity", "Remote-Party-ID", "RSeq", "RAck",
    "Refer-To", "Referred-By", "Min-Expires", "Warning", "Path", "Authentication-Info",
    "Call-Id", "Cseq", "Www-Authenticate", "Accept-Language", "Accept-Encoding",
):  # fmt: skip
    for _spelling in (_long, _long.lower(), _long.upper()):
        _KNOWN_NAMES[_spelling] = _long.lower()
for _short, _long_lower in _COMPACT_LOWER.items():
    _KNOWN_NAMES[_short] = _long_lower
    _KNOWN_NAMES[_short.upper()] = _long_lower
del _long, _spelling, _short, _long_lower


def _key(name: str) -> str:
    """The lookup key of a header name (``"v"``, ``"VIA"`` -> ``"via"``)."""
    key = _KNOWN_NAMES.get(name)
    return key if key is not None else canonical_name(name)


# Headers whose grammar is a comma-separated list (RFC 3261 §7.3.1 allows
# joining and splitting only these). Everything else -- auth headers, Date,
# From/To, unknown extension headers -- is returned whole by ``get_all``.
_LIST_HEADERS = frozenset(
    {
        "via", "route", "record-route", "contact", "accept", "accept-encoding",
        "accept-language", "alert-info", "allow", "call-info", "content-encoding",
        "content-language", "error-info", "in-reply-to", "proxy-require", "require",
        "supported", "unsupported", "warning", "allow-events", "path", "service-route",
        "p-asserted-identity", "p-preferred-identity", "reason", "accept-contact",
        "reject-contact", "request-disposition", "security-client", "security-server",
        "security-verify", "history-info", "privacy", "p-associated-uri", "accept-resource-priority",
        "resource-priority", "recv-info", "geolocation", "geolocation-error", "permission-missing",
        "trigger-consent", "p-visited-network-id", "p-early-media", "feature-caps",
    }
)  # fmt: skip

_METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
     "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH"}
)  # fmt: skip
_URI_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:[^\s<>\"]+")
_VERSION = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE)
_CALL_ID = re.compile(r"[!-~]+")
# RFC 3261 §20.17 / RFC 2822: rfc1123-date = wkday "," SP date1 SP time SP "GMT"
_DATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} "
    r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
_FOLD = re.compile(r"\r\n[ \t]+")

DEFAULT_MAX_SIZE = 65535
"""A UDP datagram cannot carry more; §18.1.1 caps what a UDP sender may use."""


def _check_field(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    if "\r" in value or "\n" in value:
        raise ValueError(f"header value of {name} contains CR or LF")


class Headers:
    """An ordered multimap of header fields, kept as received.

    Lookups are case-insensitive and treat compact forms as their long
    names (``"v"`` finds ``Via``). Iteration yields (name as received, raw
    value) in order. The structured views a message exposes (``vias``,
    ``cseq`` ...) are cached here and dropped by every mutation.
    """

    __slots__ = ("_cache", "_fields", "_first", "_keys")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str]] = []
        for name, value in fields:
            _check_field(name, value)
            self._fields.append((name, value))
        # Lower-case names aligned with _fields, and name -> first position;
        # both rebuilt on demand after a mutation.
        self._keys: list[str] | None = None
        self._first: dict[str, int] | None = None
        self._cache: dict[str, Any] = {}

    @classmethod
    def _trusted(cls, fields: list[tuple[str, str]], keys: list[str] | None = None) -> Headers:
        """Build from fields the parser already validated (and their lookup keys)."""
        self = cls.__new__(cls)
        self._fields = fields
        self._keys = keys
        self._first = None
        self._cache = {}
        return self

    def _first_map(self) -> dict[str, int]:
        first = self._first
        if first is None:
            keys = self._keys
            if keys is None:
                keys = self._keys = [_key(name) for name, _ in self._fields]
            # Reversed so that the first occurrence of each name wins.
            first = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1), strict=True))
            self._first = first
        return first

    def _position(self, name: str) -> int | None:
        """Position of the first field of that name, or None."""
        first = self._first
        if first is None:
            first = self._first_map()
        return first.get(_key(name))

    def _positions(self, name: str) -> list[int]:
        """Positions of every field of that name, in order."""
        first = self._first
        if first is None:
            first = self._first_map()
        key = _key(name)
        i = first.get(key)
        if i is None:
            return []
        keys = self._keys
        assert keys is not None  # built with the map
        if keys.count(key) == 1:
            return [i]
        return [j for j, k in enumerate(keys) if k == key]

    def _changed(self) -> None:
        self._keys = None
        self._first = None
        if self._cache:
            self._cache = {}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._position(name) is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]  # mutable, like list

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The raw value of the first field of that name, else ``default``."""
        i = self._position(name)
        return default if i is None else self._fields[i][1]

    def get_all(self, name: str) -> list[str]:
        """Every value of that header, in order. For list headers (Via, Route,
        Contact, Require ...) comma-joined values are split at top-level
        commas and empty elements dropped; other headers (auth headers, Date,
        unknown ones) are returned one value per field, never split."""
        positions = self._positions(name)
        if _key(name) not in _LIST_HEADERS:
            return [self._fields[i][1] for i in positions]
        out: list[str] = []
        for i in positions:
            out.extend(v for v in split_header_values(self._fields[i][1]) if v)
        return out

    def add(self, name: str, value: str) -> None:
        """Append a field."""
        _check_field(name, value)
        self._fields.append((name, value))
        self._changed()

    def insert(self, index: int, name: str, value: str) -> None:
        """Insert a field so that it becomes field number ``index``."""
        _check_field(name, value)
        self._fields.insert(index, (name, value))
        self._changed()

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name with one, at the first one's
        position (appended when there was none)."""
        _check_field(name, value)
        positions = self._positions(name)
        if not positions:
            self._fields.append((name, value))
        else:
            first = positions[0]
            drop = set(positions[1:])
            self._fields[first] = (name, value)
            self._fields = [f for i, f in enumerate(self._fields) if i not in drop]
        self._changed()

    def remove(self, name: str) -> int:
        """Remove every field of that name; return how many were removed."""
        positions = set(self._positions(name))
        if positions:
            self._fields = [f for i, f in enumerate(self._fields) if i not in positions]
            self._changed()
        return len(positions)

    def pop_first_value(self, name: str) -> str | None:
        """Remove and return the first comma-separated value of the first field
        of that name (popping a Via or Route); the field goes when it empties."""
        i = self._position(name)
        if i is None:
            return None
        field_name, value = self._fields[i]
        values = split_header_values(value)
        first = values[0]
        rest = [v for v in values[1:] if v]
        if rest:
            self._fields[i] = (field_name, ", ".join(rest))
        else:
            del self._fields[i]
        self._changed()
        return first

    def copy(self) -> Headers:
        """An independent copy (same fields; caches are not shared)."""
        return Headers._trusted(
            list(self._fields), None if self._keys is None else list(self._keys)
        )


class _Message(abc.ABC):
    """What requests and responses share: headers, body, structured accessors."""

    __slots__ = ("body", "headers", "version")

    headers: Headers
    body: bytes
    version: str

    @abc.abstractmethod
    def _error_status(self) -> int | None:
        """The status a fault in this message is answered with (None: drop)."""

    @abc.abstractmethod
    def _start_line(self) -> str:
        """The request line or status line, without CRLF."""

    def _fail(self, reason: str) -> ParseError:
        return ParseError(reason, self._error_status())

    def _required(self, name: str, label: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise self._fail(f"Missing {label}")
        return value

    @property
    def call_id(self) -> str:
        """The Call-ID; ParseError "Missing Call-ID" / "Bad Call-ID"."""
        cache = self.headers._cache
        value = cache.get("call_id")
        if value is None:
            value = self._required("call-id", "Call-ID")
            if not _CALL_ID.fullmatch(value):
                raise self._fail("Bad Call-ID")
            cache["call_id"] = value
        return value

    @property
    def cseq(self) -> CSeq:
        """The CSeq; ParseError "Missing CSeq" / "Bad CSeq"."""
        cache = self.headers._cache
        value = cache.get("cseq")
        if value is None:
            positions = self.headers._positions("cseq")
            if not positions:
                raise self._fail("Missing CSeq")
            if len(positions) > 1:
                raise self._fail("Bad CSeq: more than one")
            try:
                value = parse_cseq(self.headers._fields[positions[0]][1])
            except ParseError as exc:
                raise self._fail(exc.reason) from None
            cache["cseq"] = value
        return value

    @property
    def vias(self) -> list[Via]:
        """Every Via value, top first; ParseError "Missing Via" / "Bad Via"."""
        cache = self.headers._cache
        value = cache.get("vias")
        if value is None:
            headers = self.headers
            positions = headers._positions("via")
            if not positions:
                raise self._fail("Missing Via")
            value = []
            try:
                for i in positions:
                    for item in split_header_values(headers._fields[i][1]):
                        value.append(parse_via(item))
            except ParseError:
                raise self._fail("Bad Via") from None
            cache["vias"] = value
        return value

    @property
    def top_via(self) -> Via:
        return self.vias[0]

    def _name_addr(self, key: str, label: str) -> NameAddr:
        cache = self.headers._cache
        value = cache.get(key)
        if value is None:
            positions = self.headers._positions(key)
            if not positions:
                raise self._fail(f"Missing {label}")
            if len(positions) > 1:
                raise self._fail(f"Bad {label}: more than one")
            try:
                value = parse_name_addr(self.headers._fields[positions[0]][1], header=label)
            except ParseError as exc:
                raise self._fail(exc.reason) from None
            cache[key] = value
        return value

    @property
    def from_(self) -> NameAddr:
        """The From header; ParseError "Missing From" / "Bad From"."""
        return self._name_addr("from", "From")

    @property
    def to(self) -> NameAddr:
        """The To header; ParseError "Missing To" / "Bad To"."""
        return self._name_addr("to", "To")

    @property
    def contacts(self) -> list[NameAddr | Literal["*"]]:
        """Every Contact value in order (empty when absent); ParseError "Bad Contact"."""
        cache = self.headers._cache
        value = cache.get("contacts")
        if value is None:
            value = []
            try:
                for i in self.headers._positions("contact"):
                    for item in split_header_values(self.headers._fields[i][1]):
                        value.append(parse_contact(item))
            except ParseError as exc:
                raise self._fail(exc.reason) from None
            cache["contacts"] = value
        return value

    def _name_addr_list(self, key: str, label: str) -> list[NameAddr]:
        cache = self.headers._cache
        value = cache.get(key)
        if value is None:
            value = []
            try:
                for item in self.headers.get_all(key):
                    value.append(parse_name_addr(item, header=label))
            except ParseError as exc:
                raise self._fail(exc.reason) from None
            cache[key] = value
        return value

    @property
    def routes(self) -> list[NameAddr]:
        """Every Route value in order (empty when absent); ParseError "Bad Route"."""
        return self._name_addr_list("route", "Route")

    @property
    def record_routes(self) -> list[NameAddr]:
        """Every Record-Route value in order; ParseError "Bad Record-Route"."""
        return self._name_addr_list("record-route", "Record-Route")

    def _small_int(self, name: str, label: str, limit: int) -> int | None:
        value = self.headers.get(name)
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or len(value) > 10 or int(value) > limit:
            raise self._fail(f"Bad {label}")
        return int(value)

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards (0..255, RFC 3261 §20.22), None when absent; "Bad Max-Forwards"."""
        return self._small_int("max-forwards", "Max-Forwards", 255)

    @property
    def expires(self) -> int | None:
        """The Expires header in seconds (0..2**32-1, §20.19), None when absent."""
        return self._small_int("expires", "Expires", 2**32 - 1)

    @property
    def content_type(self) -> str | None:
        """The media type, lower-cased, without parameters; None when absent."""
        value = self.headers.get("content-type")
        if value is None:
            return None
        return value.partition(";")[0].strip(" \t").lower()

    def _serialise(self) -> bytes:
        headers = self.headers
        body = self.body
        length_at = headers._positions("content-length")
        lines = [self._start_line()]
        if length_at:
            skip = set(length_at[1:])
            first = length_at[0]
            for i, (name, value) in enumerate(headers._fields):
                if i == first:
                    lines.append(f"{name}: {len(body)}")
                elif i not in skip:
                    lines.append(f"{name}: {value}")
        else:
            lines.extend(f"{name}: {value}" for name, value in headers._fields)
            lines.append(f"Content-Length: {len(body)}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8") + body

    def _fields_for_eq(self) -> list[tuple[str, str]]:
        skip = set(self.headers._positions("content-length"))
        return [f for i, f in enumerate(self.headers._fields) if i not in skip]

    def __bytes__(self) -> bytes:
        """Serialise. Content-Length is written as ``len(body)``: at the first
        Content-Length field's position, or appended when there was none. The
        headers themselves are not changed."""
        return self._serialise()


class Request(_Message):
    """A SIP request. ``uri`` is the Request-URI text as received; equality
    compares start line, header fields (names as written, values, order) except
    Content-Length, which serialisation derives from the body, and body."""

    __slots__ = ("method", "uri")

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        self.method = method
        self.uri = uri
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.body = body
        self.version = version

    def _error_status(self) -> int | None:
        # §17: an ACK gets no response; faults in it are dropped and counted.
        return None if self.method == "ACK" else 400

    def _start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (
            self.method == other.method
            and self.uri == other.uri
            and self.version == other.version
            and self.body == other.body
            and self._fields_for_eq() == other._fields_for_eq()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"<Request {self.method} {self.uri} headers={len(self.headers)} body={len(self.body)}B>"
        )


class Response(_Message):
    """A SIP response; equality as for ``Request``."""

    __slots__ = ("reason", "status_code")

    def __init__(
        self,
        status_code: int,
        reason: str,
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        self.status_code = status_code
        self.reason = reason
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.body = body
        self.version = version

    def _error_status(self) -> int | None:
        return None  # a response is never answered

    def _start_line(self) -> str:
        return f"{self.version} {self.status_code} {self.reason}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return (
            self.status_code == other.status_code
            and self.reason == other.reason
            and self.version == other.version
            and self.body == other.body
            and self._fields_for_eq() == other._fields_for_eq()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"<Response {self.status_code} {self.reason} headers={len(self.headers)} body={len(self.body)}B>"


# --------------------------------------------------------------------------- parsing


def is_keepalive(data: bytes) -> bool:
    """Whether a datagram is only CRLFs (RFC 5626 §4.4.1 keep-alive / §7.5 padding)."""
    return bool(data) and not data.strip(b"\r\n")


def _parse_request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) == 3:
        method, uri, version = parts
        if (method in _METHODS or _TOKEN.fullmatch(method)) and uri and version:
            if version == "SIP/2.0":
                if uri[0] == "<":
                    raise ParseError("Request-URI in angle brackets")
                if not _URI_SHAPE.fullmatch(uri):
                    raise ParseError("Bad Request-URI")
                return method, uri, version
            if _VERSION.fullmatch(version):
                if version.upper() == "SIP/2.0":
                    return method, uri, version
                raise ParseError("Version Not Supported", 505)
    # Not the strict form. Say what is wrong when it is recognisably a request
    # (RFC 4475 §3.1.2.9 lwsstart, §3.1.2.10 trws); drop anything else.
    words = line.split()
    if len(words) >= 3 and _TOKEN.fullmatch(words[0]) and _VERSION.fullmatch(words[-1]):
        if len(words) == 3:
            raise ParseError("Bad request line: extra whitespace")
        raise ParseError("Bad request line")
    raise ParseError("Not a SIP message", None)


def _parse_status_line(line: str) -> tuple[str, int, str]:
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if version.upper() != "SIP/2.0":
        raise ParseError("Unsupported SIP version in response", None)
    if len(code) != 3 or not code.isascii() or not code.isdigit() or not "100" <= code <= "699":
        raise ParseError("Bad status code", None)
    return version, int(code), reason


def _split_fields(lines: list[str], status: int | None) -> tuple[list[tuple[str, str]], list[str]]:
    """Header lines (folding already undone) as (name, value) pairs, plus each
    field's lookup key. Comprehensions over the lines: the common spellings
    need no per-line Python branching."""
    parts = [line.partition(":") for line in lines]
    known = _KNOWN_NAMES
    keys = [known.get(name) for name, _, _ in parts]
    if None in keys:
        for i, (name, sep, _) in enumerate(parts):
            if keys[i] is None:
                if not sep:
                    raise ParseError("Bad header line", status)
                name = name.rstrip(" \t")  # "TO :" -- LWS before the colon (RFC 4475 wsinv)
                if not _TOKEN.fullmatch(name):
                    raise ParseError("Bad header name", status)
                keys[i] = canonical_name(name)
                parts[i] = (name, sep, parts[i][2])
    fields = [(name, value.strip(" \t")) for name, _, value in parts]
    return fields, keys  # type: ignore[return-value]  # every None was replaced above


def parse_message(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Request | Response:
    """Parse one complete datagram (or one message cut by ``StreamFramer``).

    Returns a ``Request`` or ``Response``. Raises ``ParseError`` whose
    ``status_code`` is the answer (400, 505, 513) or ``None`` for input that
    must be dropped (responses, ACKs, non-SIP bytes, keep-alives).
    """
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2  # §7.5: CRLFs before the start line are ignored
    is_response = data.startswith(b"SIP/", start)
    status: int | None = None if is_response else 400
    if len(data) - start > max_size:
        raise ParseError("Message Too Large", None if is_response else 513)
    if start == len(data):
        raise ParseError("Empty message", None)
    head_end = data.find(b"\r\n\r\n", start)
    if head_end < 0:
        raise ParseError("Missing end of header block", None)
    try:
        head = data[start:head_end].decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("Invalid UTF-8", status) from None
    if "\r\n " in head or "\r\n\t" in head:
        head = _FOLD.sub(" ", head)  # §7.3.1: folding is equivalent to one SP
    lines = head.split("\r\n")
    first = lines[0]
    message: Request | Response
    if is_response:
        version, code, reason = _parse_status_line(first)
    else:
        try:
            method, uri, version = _parse_request_line(first)
        except ParseError as exc:
            if first.startswith("ACK ") and exc.status_code is not None:
                raise ParseError(exc.reason, None) from None
            raise
        if method == "ACK":
            status = None  # §17.2.1: an ACK is never answered
    breaks = len(lines) - 1
    if head.count("\r") != breaks or head.count("\n") != breaks:
        raise ParseError("Bare CR or LF in header block", status)
    del lines[0]
    fields, keys = _split_fields(lines, status)
    headers = Headers._trusted(fields, keys)
    if is_response:
        message = Response(code, reason, headers, b"", version)
    else:
        message = Request(method, uri, headers, b"", version)

    body_start = head_end + 4
    lengths = headers._positions("content-length") if "content-length" in keys else None
    if lengths:
        values = {fields[i][1] for i in lengths}
        if len(values) > 1:
            raise ParseError("Conflicting Content-Length", status)
        text = values.pop()
        if not (text.isascii() and text.isdigit()) or len(text) > 10:
            raise ParseError("Bad Content-Length", status)
        length = int(text)
        if body_start + length > len(data):
            raise ParseError("Content-Length exceeds body", status)
        message.body = data[body_start : body_start + length]
    else:
        message.body = data[body_start:]

    # The facts every element relies on, checked once (RFC 4475 §3.1.2, §3.3.1);
    # the results stay cached for the engine.
    cseq = _check_core(headers, fields, keys, status)
    if not is_response and cseq.method != method:
        raise ParseError("CSeq method does not match", status)
    return message


def _all_values(fields: list[tuple[str, str]], keys: list[str], key: str, first: int) -> list[str]:
    if keys.count(key) == 1:
        return [fields[first][1]]
    return [fields[j][1] for j, k in enumerate(keys) if k == key]


def _check_core(
    headers: Headers, fields: list[tuple[str, str]], keys: list[str], status: int | None
) -> CSeq:
    """Parse Via, From, To, Call-ID, CSeq (and Contact, Date when present) into
    the accessor cache, raising what the accessors would. This is the same
    work as reading those accessors, without their per-call overhead."""
    first = headers._first_map()
    cache = headers._cache
    i = first.get("via")
    if i is None:
        raise ParseError("Missing Via", status)
    vias: list[Via] = []
    try:
        for value in _all_values(fields, keys, "via", i):
            for item in split_header_values(value) if "," in value else (value,):
                vias.append(parse_via(item))
    except ParseError:
        raise ParseError("Bad Via", status) from None
    cache["vias"] = vias
    for key, label in (("from", "From"), ("to", "To")):
        i = first.get(key)
        if i is None:
            raise ParseError(f"Missing {label}", status)
        if keys.count(key) > 1:
            raise ParseError(f"Bad {label}: more than one", status)
        try:
            cache[key] = parse_name_addr(fields[i][1], header=label)
        except ParseError as exc:
            raise ParseError(exc.reason, status) from None
    i = first.get("call-id")
    if i is None:
        raise ParseError("Missing Call-ID", status)
    call_id = fields[i][1]
    if not _CALL_ID.fullmatch(call_id):
        raise ParseError("Bad Call-ID", status)
    cache["call_id"] = call_id
    i = first.get("cseq")
    if i is None:
        raise ParseError("Missing CSeq", status)
    if keys.count("cseq") > 1:
        raise ParseError("Bad CSeq: more than one", status)
    try:
        cseq = parse_cseq(fields[i][1])
    except ParseError as exc:
        raise ParseError(exc.reason, status) from None
    cache["cseq"] = cseq
    i = first.get("contact")
    if i is not None:
        contacts: list[NameAddr | Literal["*"]] = []
        try:
            for value in _all_values(fields, keys, "contact", i):
                for item in split_header_values(value) if "," in value else (value,):
                    contacts.append(parse_contact(item))
        except ParseError as exc:
            raise ParseError(exc.reason, status) from None
        cache["contacts"] = contacts
    i = first.get("date")
    if i is not None:
        for value in _all_values(fields, keys, "date", i):
            if not _DATE.fullmatch(value):
                raise ParseError("Bad Date", status)
    return cseq


def make_response(
    request: Request,
    status_code: int,
    reason: str,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """Build a response to ``request`` (RFC 3261 §8.2.6.2): every Via in order,
    From, To (with ``;tag=to_tag`` added when given and the To has none),
    Call-ID and CSeq, then ``headers``. Content-Length is written on
    serialisation. Raises ``ParseError`` if the request lacks what a response
    must copy (never the case for a request ``parse_message`` returned)."""
    src = request.headers
    fields: list[tuple[str, str]] = []
    for i in src._positions("via"):
        fields.append(("Via", src._fields[i][1]))
    fields.append(("From", request._required("from", "From")))
    to_value = request._required("to", "To")
    if to_tag is not None and request.to.tag is None:
        to_value = f"{to_value};tag={to_tag}"
    fields.append(("To", to_value))
    fields.append(("Call-ID", request._required("call-id", "Call-ID")))
    fields.append(("CSeq", request._required("cseq", "CSeq")))
    response = Response(status_code, reason, Headers(fields), body)
    for name, value in headers:
        response.headers.add(name, value)
    return response
