"""SIP messages: parse a datagram into a Request or Response, serialise back.

Theory of operation. A proxy-like element reads a few headers of every
message and all headers of few, so the parser does only what must happen at
once and leaves the rest for first access. ``parse_message`` splits the
header block into lines once, keeps every field raw, in order, as (name as
received, value), and indexes the lookup keys (lower-case long names, compact
forms folded in). It then checks what decides whether the message exists at
all: the start line, the presence of Via, From, To, Call-ID and CSeq, the
CSeq (number, and method against the request's), Content-Length, Date, and
a REGISTER's Contact (the binding a registrar judges before anything else).

Structured views (``vias``, ``top_via``, ``from_``, ``to``, ``contacts``,
``routes`` ...) are parsed on first access and cached in the ``Headers``
object; a syntax error there raises ``ParseError`` from the accessor, with
the status this message's faults are answered with. One exception: when the
top Via, From and To all have the shape every stack writes, the parser
reads the three with one regex call and caches them (every element reads
them first thing); anything else waits for its accessor as above. The
engine reads Via, From, To, Call-ID and CSeq of every request first thing
and answers 400 statelessly, so a malformed From is refused exactly as
before, only later. Mutating the headers drops the cache.

What it refuses, and how (RFC 3261 §7, §18.3, §20; RFC 4475 §3.1.2, §3.3):
* a request line with extra or trailing spaces, or a Request-URI in ``<>``
  -> 400; a version other than SIP/2.0 in a request -> 505;
* a missing Via, From, To, Call-ID or CSeq, a repeated From, To or CSeq, a
  bad Call-ID or CSeq, a CSeq method different from the request method, a
  malformed Date, a REGISTER's malformed Contact -> 400 naming the header
  ("Missing Call-ID", "Bad Contact"); the accessors say "Bad Via",
  "Bad From" ... the same way;
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

Speed: ``bench/parse.py`` measures this parser against a bare line splitter
and other pure-Python SIP parsers. What made it fast: one ``str.split`` and
one ``partition(": ")`` per line (the separator every stack writes; other
spellings are fixed up afterwards), name lookups in one precomputed table,
fields stored as the partition triples themselves, no structured header
built until someone asks but the three every element asks for (one regex
call), and possessive regexes (no backtracking state) in every fast path.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Iterator
from sys import intern
from typing import Any, Literal

from ._errors import ParseError
from ._headers import (
    _COMPACT_LOWER,
    _FROM_TO_COMMON,
    _TOKEN,
    _TRANSPORTS,
    _URI_COMMON,
    _VIA_FROM_TO_COMMON,
    KNOWN_METHODS,
    CSeq,
    NameAddr,
    Params,
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
        # Interned, so look-ups with the literal keys below compare by identity.
        _KNOWN_NAMES[_spelling] = intern(_long.lower())
for _short, _long_lower in _COMPACT_LOWER.items():
    _KNOWN_NAMES[_short] = intern(_long_lower)
    _KNOWN_NAMES[_short.upper()] = intern(_long_lower)
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

_URI_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:[^\s<>\"]+")
_VERSION = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE)
# RFC 3261 §20.17 / RFC 2822: rfc1123-date = wkday "," SP date1 SP time SP "GMT"
_DATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} "
    r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
_FOLD = re.compile(r"\r\n[ \t]+")

_REQUIRED = (
    ("via", "Via"),
    ("from", "From"),
    ("to", "To"),
    ("call-id", "Call-ID"),
    ("cseq", "CSeq"),
)
_REQUIRED_KEYS = frozenset(key for key, _ in _REQUIRED)
_REQUEST_LINE_COMMON = re.compile(rf"([A-Z]++) ({_URI_COMMON.pattern}) SIP/2\.0")
"""The request line every stack sends: an upper-case method (a token), a URI
as ``_URI_COMMON`` knows it, single spaces."""
_STATUS_CODES = {str(code): code for code in range(100, 700)}
"""Status-Code = 3DIGIT, 100..699 (RFC 3261 §7.2, §21): its text -> its value."""
_new = object.__new__

_SEP = ": "
"""The separator every stack writes between name and value. A field is kept
as the triple ``line.partition(": ")`` gives, (name, ": ", value), so the
parser stores what it split without copying and serialises with one join."""
_Field = tuple[str, str, str]
_Index = tuple[list[str], set[str]]

DEFAULT_MAX_SIZE = 65535
"""A UDP datagram cannot carry more; §18.1.1 caps what a UDP sender may use."""


def _check_field(name: str, value: str) -> None:
    if name not in _KNOWN_NAMES and not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    if "\r" in value or "\n" in value:
        raise ValueError(f"header value of {name} contains CR or LF")


def _is_call_id(value: str) -> bool:
    """callid = word ["@" word] (§25.1): visible ASCII, no SP, not empty."""
    return value.isascii() and value.isprintable() and " " not in value and value != ""


class Headers:
    """An ordered multimap of header fields, kept as received.

    Lookups are case-insensitive and treat compact forms as their long
    names (``"v"`` finds ``Via``). Iteration yields (name as received, raw
    value) in order. The structured views a message exposes (``vias``,
    ``cseq`` ...) are cached here and dropped by every mutation.
    """

    __slots__ = ("_cache", "_fields", "_index")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[_Field] = []
        for name, value in fields:
            _check_field(name, value)
            self._fields.append((name, _SEP, value))
        self._index: _Index | None = None
        self._cache: dict[str, Any] = {}

    @classmethod
    def _trusted(cls, fields: list[_Field], index: _Index | None = None) -> Headers:
        """Build from fields the parser already validated (and their index)."""
        self = cls.__new__(cls)
        self._fields = fields
        self._index = index
        self._cache = {}
        return self

    def _get_index(self) -> _Index:
        """The lookup keys aligned with the fields (interned lower-case long
        names) and their set, rebuilt on demand after a mutation. A message
        has a couple of dozen fields at most: a set answers "is it there",
        and the list, scanned in C, says where; a dict of positions costs more
        to build than all the look-ups of a message."""
        index = self._index
        if index is None:
            keys = [_key(name) for name, _, _ in self._fields]
            index = self._index = (keys, set(keys))
        return index

    def _position(self, name: str) -> int | None:
        """Position of the first field of that name, or None."""
        keys, present = self._index or self._get_index()
        key = _key(name)
        return keys.index(key) if key in present else None

    def _positions(self, name: str) -> list[int]:
        """Positions of every field of that name, in order."""
        return self._key_positions(_key(name))

    def _key_positions(self, key: str) -> list[int]:
        keys, present = self._index or self._get_index()
        if key not in present:
            return []
        if len(present) == len(keys) or keys.count(key) == 1:
            return [keys.index(key)]
        return [i for i, k in enumerate(keys) if k == key]

    def _changed(self) -> None:
        self._index = None
        if self._cache:
            self._cache = {}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((name, value) for name, _, value in self._fields)

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
        return f"Headers({list(self)!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The raw value of the first field of that name, else ``default``."""
        i = self._position(name)
        return default if i is None else self._fields[i][2]

    def get_all(self, name: str) -> list[str]:
        """Every value of that header, in order. For list headers (Via, Route,
        Contact, Require ...) comma-joined values are split at top-level
        commas and empty elements dropped; other headers (auth headers, Date,
        unknown ones) are returned one value per field, never split."""
        positions = self._positions(name)
        fields = self._fields
        if _key(name) not in _LIST_HEADERS:
            return [fields[i][2] for i in positions]
        out: list[str] = []
        for i in positions:
            value = fields[i][2]
            if "," in value:
                out.extend(v for v in split_header_values(value) if v)
            elif value:
                out.append(value)
        return out

    # add, insert and a one-field set keep the index up to date instead of
    # dropping it: building a response adds a field or two and then looks
    # Content-Length up to serialise.

    def add(self, name: str, value: str) -> None:
        """Append a field."""
        _check_field(name, value)
        self._fields.append((name, _SEP, value))
        index = self._index
        if index is not None:
            key = _key(name)
            index[0].append(key)
            index[1].add(key)
        if self._cache:
            self._cache = {}

    def insert(self, index: int, name: str, value: str) -> None:
        """Insert a field so that it becomes field number ``index``."""
        _check_field(name, value)
        self._fields.insert(index, (name, _SEP, value))
        keys_index = self._index
        if keys_index is not None:
            key = _key(name)
            keys_index[0].insert(index, key)  # list.insert: the same place as the field's
            keys_index[1].add(key)
        if self._cache:
            self._cache = {}

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name with one, at the first one's
        position (appended when there was none)."""
        _check_field(name, value)
        positions = self._positions(name)
        if len(positions) == 1:
            self._fields[positions[0]] = (name, _SEP, value)  # same key, same place
            if self._cache:
                self._cache = {}
            return
        if not positions:
            self.add(name, value)
            return
        first = positions[0]
        drop = set(positions[1:])
        self._fields[first] = (name, _SEP, value)
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
        field_name, _, value = self._fields[i]
        values = split_header_values(value)
        first = values[0]
        rest = [v for v in values[1:] if v]
        if rest:
            self._fields[i] = (field_name, _SEP, ", ".join(rest))
        else:
            del self._fields[i]
        self._changed()
        return first

    def copy(self) -> Headers:
        """An independent copy (same fields; caches are not shared)."""
        index = self._index
        return Headers._trusted(
            list(self._fields), None if index is None else (list(index[0]), set(index[1]))
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
            if not _is_call_id(value):
                raise self._fail("Bad Call-ID")
            cache["call_id"] = value
        return value

    @property
    def cseq(self) -> CSeq:
        """The CSeq; ParseError "Missing CSeq" / "Bad CSeq"."""
        cache = self.headers._cache
        value = cache.get("cseq")
        if value is None:
            positions = self.headers._key_positions("cseq")
            if not positions:
                raise self._fail("Missing CSeq")
            if len(positions) > 1:
                raise self._fail("Bad CSeq: more than one")
            try:
                value = parse_cseq(self.headers._fields[positions[0]][2])
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
            fields = headers._fields
            positions = headers._key_positions("via")
            if not positions:
                raise self._fail("Missing Via")
            value = []
            try:
                for i in positions:
                    text = fields[i][2]
                    for item in split_header_values(text) if "," in text else (text,):
                        value.append(parse_via(item))
            except ParseError:
                raise self._fail("Bad Via") from None
            top = cache.get("top_via")
            if top is not None:
                value[0] = top  # equal; keeps top_via is vias[0]
            cache["vias"] = value
            cache["top_via"] = value[0]
        return value

    @property
    def top_via(self) -> Via:
        """The first Via value, parsed alone (the others wait for ``vias``);
        ParseError "Missing Via" / "Bad Via"."""
        headers = self.headers
        cache = headers._cache
        value = cache.get("top_via")
        if value is None:
            keys, present = headers._index or headers._get_index()
            if "via" not in present:
                raise self._fail("Missing Via")
            text = headers._fields[keys.index("via")][2]
            if "," in text:
                text = split_header_values(text)[0]
            try:
                value = parse_via(text)
            except ParseError:
                raise self._fail("Bad Via") from None
            cache["top_via"] = value
        return value

    def _name_addr(self, key: str, label: str) -> NameAddr:
        headers = self.headers
        keys, present = headers._index or headers._get_index()
        if key not in present:
            raise self._fail(f"Missing {label}")
        if len(present) != len(keys) and keys.count(key) > 1:
            raise self._fail(f"Bad {label}: more than one")
        text = headers._fields[keys.index(key)][2]
        m = _FROM_TO_COMMON.fullmatch(text)
        value: NameAddr
        if m is not None:  # <uri>;tag=x, "name" <uri>, uri;tag=x: read on every message
            display, uri, tag, spec, spec_tag = m.groups()
            if uri is not None:
                value = NameAddr(display, uri, () if tag is None else (("tag", tag),))
            else:
                params = () if spec_tag is None else (("tag", spec_tag),)
                value = NameAddr(None, spec, params, False)
        else:
            try:
                value = parse_name_addr(text, header=label)
            except ParseError as exc:
                raise self._fail(exc.reason) from None
        headers._cache[key] = value
        return value

    @property
    def from_(self) -> NameAddr:
        """The From header; ParseError "Missing From" / "Bad From"."""
        value: NameAddr | None = self.headers._cache.get("from")
        return self._name_addr("from", "From") if value is None else value

    @property
    def to(self) -> NameAddr:
        """The To header; ParseError "Missing To" / "Bad To"."""
        value: NameAddr | None = self.headers._cache.get("to")
        return self._name_addr("to", "To") if value is None else value

    @property
    def contacts(self) -> list[NameAddr | Literal["*"]]:
        """Every Contact value in order (empty when absent); ParseError "Bad Contact"."""
        cache = self.headers._cache
        value = cache.get("contacts")
        if value is None:
            headers = self.headers
            value = _parse_contacts(headers._fields, headers._key_positions("contact"), self._fail)
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
        fields = headers._fields
        body = self.body
        lines = [self._start_line()]
        lines.extend(map("".join, fields))  # each field is (name, ": ", value)
        length_at = headers._key_positions("content-length")
        if length_at:
            first = length_at[0]
            lines[first + 1] = f"{fields[first][0]}: {len(body)}"
            for i in reversed(length_at[1:]):
                del lines[i + 1]
        else:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8") + body

    def _fields_for_eq(self) -> list[_Field]:
        skip = set(self.headers._key_positions("content-length"))
        return [f for i, f in enumerate(self.headers._fields) if i not in skip]

    def __bytes__(self) -> bytes:
        """Serialise. Content-Length is written as ``len(body)``: at the first
        Content-Length field's position, or appended when there was none. The
        headers themselves are not changed."""
        return self._serialise()

    def _forget_received(self) -> None:
        """Drop the datagram (the engine, once it has handled the message)."""
        self.headers._cache.pop("received", None)

    def as_received(self) -> bytes:
        """The bytes ``parse_message`` read this message from (without leading
        CRLFs or bytes past Content-Length), while its start line, headers and
        body are unchanged and the engine is handling it; otherwise, or for a
        message built here, ``bytes(self)``.
        For ladders and logs, which show a message as it came, without
        serialising it again."""
        received = self.headers._cache.get("received")
        if received is not None:
            data, end, body, start_line = received
            if body is self.body and start_line == self._start_line():
                wire: bytes = data if end == len(data) else data[:end]
                return wire
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
        if (method in KNOWN_METHODS or _TOKEN.fullmatch(method)) and uri and version:
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


def _fix_fields(
    lines: list[str], fields: list[_Field], keys: list[str | None], status: int | None
) -> tuple[list[str], list[_Field], list[str]]:
    """Redo the lines ``partition(": ")`` did not split into a known name:
    other spellings ("X-Custom", "TO :", "Via:x"), folded continuation lines,
    and bad lines. Returns the (possibly unfolded) lines, fields and keys."""
    if any(lines[i][:1] in (" ", "\t") for i, key in enumerate(keys) if key is None):
        # §7.3.1: a line starting with LWS continues the previous field;
        # unfolding replaces the line break and the LWS with one SP. The start
        # line cannot be continued.
        if lines[0][:1] in (" ", "\t"):
            raise ParseError("Bad header line: continuation of the start line", status)
        lines = _FOLD.sub(" ", "\r\n".join(lines)).split("\r\n")
        fields = [line.partition(_SEP) for line in lines]
        keys = [_KNOWN_NAMES.get(name) for name, _, _ in fields]
    for i, key in enumerate(keys):
        if key is None:
            name, sep, value = lines[i].partition(":")
            if not sep:
                raise ParseError("Bad header line", status)
            name = name.rstrip(" \t")  # "TO :" -- LWS before the colon (RFC 4475 wsinv)
            if not _TOKEN.fullmatch(name):
                raise ParseError("Bad header name", status)
            keys[i] = intern(_key(name))
            fields[i] = (name, _SEP, value.strip(" \t"))
    return lines, fields, keys  # type: ignore[return-value]  # every None was replaced


def parse_message(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Request | Response:
    """Parse one complete datagram (or one message cut by ``StreamFramer``).

    Returns a ``Request`` or ``Response``. Raises ``ParseError`` whose
    ``status_code`` is the answer (400, 505, 513) or ``None`` for input that
    must be dropped (responses, ACKs, non-SIP bytes, keep-alives). Faults in
    headers parsed on first access (Via, From, To, Contact, Route ...) are
    raised by those accessors instead, the same way.
    """
    if data and data[0] == 13 and data[:2] == b"\r\n":
        # §7.5: CRLFs before the start line are ignored.
        start = 2
        while data.startswith(b"\r\n", start):
            start += 2
        data = data[start:]
    is_response = data[:4] == b"SIP/"
    status: int | None = None if is_response else 400
    if len(data) > max_size:
        raise ParseError("Message Too Large", None if is_response else 513)
    if not data:
        raise ParseError("Empty message", None)
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        raise ParseError("Missing end of header block", None)
    try:
        head = data[:head_end].decode()
    except UnicodeDecodeError:
        raise ParseError("Invalid UTF-8", status) from None
    lines = head.split("\r\n")
    first_line = lines[0]
    if is_response:
        # "SIP/2.0 <code> <reason>", checked inline; anything else by
        # _parse_status_line.
        parts = first_line.split(" ", 2)
        code_or_none = _STATUS_CODES.get(parts[1]) if len(parts) > 1 else None
        if code_or_none is not None and parts[0] == "SIP/2.0":
            version, code = "SIP/2.0", code_or_none
            reason = parts[2] if len(parts) == 3 else ""
        else:
            version, code, reason = _parse_status_line(first_line)
    else:
        # The strict form every stack sends, checked inline; anything else is
        # judged (and named) by _parse_request_line.
        request_line = _REQUEST_LINE_COMMON.fullmatch(first_line)
        if request_line is not None:
            method, uri = request_line.groups()
            version = "SIP/2.0"
        else:
            try:
                method, uri, version = _parse_request_line(first_line)
            except ParseError as exc:
                if first_line.startswith("ACK ") and exc.status_code is not None:
                    raise ParseError(exc.reason, None) from None
                raise
        if method == "ACK":
            status = None  # §17.2.1: an ACK is never answered
    # The text without its line breaks: a CR or LF left in it was bare.
    # (Single-character searches are memchr; every check here is a C loop.)
    text = "".join(lines)
    if "\r" in text or "\n" in text:
        raise ParseError("Bare CR or LF in header block", status)
    del lines[0]

    # Fields: one partition per line at the usual ": ", one table look-up per
    # name; other spellings, folding and bad lines are left to _fix_fields.
    fields = [line.partition(_SEP) for line in lines]
    known = _KNOWN_NAMES
    keys_or_none = [known.get(field[0]) for field in fields]
    present_or_none = set(keys_or_none)
    keys: list[str]
    present: set[str]
    if None in present_or_none:  # a set look-up, not a comparison per key
        lines, fields, keys = _fix_fields(lines, fields, keys_or_none, status)
        present = set(keys)
    else:
        keys = keys_or_none  # type: ignore[assignment]  # no None in it
        present = present_or_none  # type: ignore[assignment]
    if "\t" in text or ":  " in head or " \r\n" in head or head[-1] == " ":
        # LWS the partition left around a value (rare): strip them all. (Every
        # CR here starts a CRLF, bare ones were refused above; the longer
        # needle lets the search skip further.)
        fields = [(name, sep, value.strip(" \t")) for name, sep, value in fields]
    repeated = len(present) != len(keys)

    body_start = head_end + 4
    if "content-length" in present:
        # Content-Length is usually the last field: look there before scanning.
        at = len(keys) - 1 if keys[-1] == "content-length" else keys.index("content-length")
        value = fields[at][2]
        if (
            repeated
            and keys.count("content-length") > 1
            and len({f[2] for f, k in zip(fields, keys, strict=True) if k == "content-length"}) > 1
        ):
            raise ParseError("Conflicting Content-Length", status)
        if value == "0":
            body = b""  # most messages but INVITEs and their 200s
        else:
            if not (value.isascii() and value.isdigit()) or len(value) > 10:
                raise ParseError("Bad Content-Length", status)
            length = int(value)
            if body_start + length > len(data):
                raise ParseError("Content-Length exceeds body", status)
            body = data[body_start : body_start + length]
    else:
        body = data[body_start:]

    # What every element relies on before anything else (RFC 4475 §3.1.2,
    # §3.3.1). Via, From and To are only looked for here: they are parsed
    # below when all three are usual, otherwise (and a repeated From or To
    # refused) on first access.
    if not present >= _REQUIRED_KEYS:
        for key, label in _REQUIRED:
            if key not in present:
                raise ParseError(f"Missing {label}", status)
    call_id = fields[keys.index("call-id")][2]
    if not (call_id.isascii() and call_id.isprintable()) or " " in call_id or not call_id:
        raise ParseError("Bad Call-ID", status)  # callid = word ["@" word] (§25.1)
    if repeated and keys.count("cseq") > 1:
        raise ParseError("Bad CSeq: more than one", status)
    cseq_text = fields[keys.index("cseq")][2]
    number, _, cseq_method = cseq_text.partition(" ")
    if (
        cseq_method in KNOWN_METHODS
        and number.isdigit()
        and number.isascii()
        and len(number) < 10  # below 2**31 without converting twice
    ):
        # "<digits> <METHOD>", as stacks write it; built as parse_cseq would,
        # without a call to the class (its __init__ is a Python call).
        cseq = _new(CSeq)
        cseq.number = int(number)
        cseq.method = cseq_method
    else:
        try:
            cseq = parse_cseq(cseq_text)
        except ParseError as exc:
            raise ParseError(exc.reason, status) from None
    # The message and its headers, built directly: the parser has already
    # checked everything their constructors would.
    headers = _new(Headers)
    headers._fields = fields
    headers._index = (keys, present)
    headers._cache = cache = {"call_id": call_id, "cseq": cseq}
    if not repeated or (keys.count("from") == 1 and keys.count("to") == 1):
        _cache_via_from_to(fields, keys, cache)

    message: Request | Response
    if is_response:
        message = _new(Response)
        message.status_code = code
        message.reason = reason
    else:
        if cseq.method != method:
            raise ParseError("CSeq method does not match", status)
        message = _new(Request)
        message.method = method
        message.uri = uri
        if method == "REGISTER" and "contact" in present:
            # The registrar judges the binding before it challenges (RFC 4475
            # §3.1.2.13 regbadct: 400, not 401).
            cache["contacts"] = _parse_contacts(
                fields, headers._key_positions("contact"), message._fail
            )
    message.headers = headers
    message.body = body
    message.version = version
    # For as_received(); a change to the headers drops the cache and with it this.
    cache["received"] = (data, body_start + len(body), body, first_line)
    if "date" in present:
        for j in headers._key_positions("date"):
            if not _DATE.fullmatch(fields[j][2]):
                raise ParseError("Bad Date", status)
    return message


def _cache_via_from_to(fields: list[_Field], keys: list[str], cache: dict[str, Any]) -> None:
    """Parse the top Via, From and To together, in one regex call, when all
    three have the shape every stack writes, and cache them for their
    accessors: the engine reads the three of every message first thing.
    Otherwise leave them to the accessors, which parse each on first access
    and say what is wrong."""
    via_text = fields[keys.index("via")][2]
    from_text = fields[keys.index("from")][2]
    to_text = fields[keys.index("to")][2]
    m = _VIA_FROM_TO_COMMON.fullmatch(f"{via_text}\n{from_text}\n{to_text}")
    if m is None:
        return
    (transport, sent_by, host, port_text, n1, v1, n2, v2, n3, v3,
     fd, fu, ft, fs, fst, td, tu, tt, ts, tst) = m.groups()  # fmt: skip
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            return  # top_via says "Bad Via"
    if host[0] == "[":
        host = host[1:-1]
    if transport not in _TRANSPORTS:
        transport = transport.upper()
    if n1 is None:
        params: Params = ()
    elif n2 is None:
        params = ((n1, v1),)
    elif n3 is None:
        params = ((n1, v1), (n2, v2))
    else:
        params = ((n1, v1), (n2, v2), (n3, v3))
    # What parse_via and parse_name_addr's fast paths build, built here
    # without calling the classes (their generated __init__ is a Python call
    # each). Every attrs field is set, as __init__ would; tests/unit/
    # test_message.py compares them with the parsers' field by field.
    via = _new(Via)
    via.protocol = "SIP/2.0"
    via.transport = transport
    via.host = host
    via.port = port
    via.params = params
    via._sent_by = sent_by
    cache["top_via"] = via
    cache["from"] = from_addr = _new(NameAddr)
    if fu is not None:
        from_addr.display_name = fd
        from_addr.uri = fu
        from_addr.params = () if ft is None else (("tag", ft),)
        from_addr.angle = True
    else:
        from_addr.display_name = None
        from_addr.uri = fs
        from_addr.params = () if fst is None else (("tag", fst),)
        from_addr.angle = False
    from_addr._parsed = None
    cache["to"] = to_addr = _new(NameAddr)
    if tu is not None:
        to_addr.display_name = td
        to_addr.uri = tu
        to_addr.params = () if tt is None else (("tag", tt),)
        to_addr.angle = True
    else:
        to_addr.display_name = None
        to_addr.uri = ts
        to_addr.params = () if tst is None else (("tag", tst),)
        to_addr.angle = False
    to_addr._parsed = None


def _parse_contacts(
    fields: list[_Field], positions: list[int], fail: Callable[[str], ParseError]
) -> list[NameAddr | Literal["*"]]:
    contacts: list[NameAddr | Literal["*"]] = []
    try:
        for i in positions:
            value = fields[i][2]
            for item in split_header_values(value) if "," in value else (value,):
                contacts.append(parse_contact(item))
    except ParseError as exc:
        raise fail(exc.reason) from None
    return contacts


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
    must copy (never the case for a request ``parse_message`` returned), or
    when ``to_tag`` is given and its To is malformed (To is parsed on first
    access)."""
    src = request.headers
    src_fields = src._fields
    fields: list[_Field] = [("Via", _SEP, src_fields[i][2]) for i in src._key_positions("via")]
    keys = ["via"] * len(fields)
    if not fields:
        raise request._fail("Missing Via")
    fields.append(("From", _SEP, request._required("from", "From")))
    to_value = request._required("to", "To")
    if to_tag is not None and request.to.tag is None:
        to_value = f"{to_value};tag={to_tag}"
    fields.append(("To", _SEP, to_value))
    fields.append(("Call-ID", _SEP, request._required("call-id", "Call-ID")))
    fields.append(("CSeq", _SEP, request._required("cseq", "CSeq")))
    keys += ["from", "to", "call-id", "cseq"]
    for name, value in headers:
        _check_field(name, value)
        fields.append((name, _SEP, value))
        keys.append(_key(name))
    return Response(status_code, reason, Headers._trusted(fields, (keys, set(keys))), body)
