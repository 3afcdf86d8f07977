"""URIs: SIP and SIPS (RFC 3261 §19.1, §25.1), tel (RFC 3966), and any other scheme.

This module owns the syntax of the URI text found in a Request-URI or inside a
name-addr. It keeps what it parses *as written*: user parts keep their
%-escapes (RFC 4475 §3.1.1.3: "the escapes must not be lost when forwarding"),
parameter names keep their case, IPv6 references lose only their brackets.
Comparison rules (§19.1.4) belong to whoever compares; ``user_unescaped`` and
``unescape`` give them the unescaped forms.

A URI whose scheme is not sip, sips or tel parses as ``AbsoluteUri`` (RFC 4475
§3.3.2 unkscm, §3.3.4 unksm2): the message stays well-formed and the element
decides (416, or routing without looking inside).

Errors are ``ParseError`` with status 400 and a reason naming the fault.
"""

from __future__ import annotations

import re
import urllib.parse

import attrs

from ._errors import ParseError

__all__ = [
    "AbsoluteUri",
    "SipUri",
    "TelUri",
    "format_host",
    "parse_uri",
    "unescape",
]

# RFC 3261 §25.1: unreserved = alphanum / mark; mark = - _ . ! ~ * ' ( )
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
# user = 1*( unreserved / escaped / user-unreserved ); user-unreserved = & = + $ , ; ? /
_USER = rf"[{_UNRESERVED}&=+$,;?/%]+"
# password = *( unreserved / escaped / & = + $ , )
_PASSWORD = rf"[{_UNRESERVED}&=+$,%]*"
# hostname or IPv4 (underscores are not in the ABNF but appear in deployed host
# names, e.g. SRV-style labels; accepting them costs nothing), or an IPv6 reference.
_HOST = r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-_.]+"
# paramchar = param-unreserved / unreserved / escaped; param-unreserved = [ ] / : & + $
_PARAMCHARS = rf"[{_UNRESERVED}\[\]/:&+$%]"
# hname / hvalue = hnv-unreserved / unreserved / escaped; hnv-unreserved = [ ] / ? : + $
_HCHARS = rf"[{_UNRESERVED}\[\]/?:+$%]"

_SIP_REST = re.compile(
    rf"(?:(?P<user>{_USER})(?::(?P<password>{_PASSWORD}))?@)?"
    rf"(?P<host>{_HOST})"
    r"(?::(?P<port>[0-9]{1,5}))?"
    rf"(?P<params>(?:;{_PARAMCHARS}+(?:={_PARAMCHARS}*)?)*)"
    rf"(?:\?(?P<headers>(?:{_HCHARS}|[=&])+))?"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3966: global-number-digits = "+" *phonedigit DIGIT *phonedigit, local numbers
# add hex digits, * and #; visual separators - . ( )
_TEL_NUMBER = re.compile(r"\+?[0-9A-Fa-f*#\-.()]*[0-9A-Fa-f*#][0-9A-Fa-f*#\-.()]*")
_TEL_PARAM = re.compile(r"[A-Za-z0-9\-]+(?:=[A-Za-z0-9\-_.!~*'()\[\]/:&+$%]+)?")
# Characters never allowed unescaped in any URI we keep verbatim (RFC 3986 §2, §3).
_ABSOLUTE_BAD = re.compile(r"[\x00-\x20\x7f<>\"{}|\\^`]")

Params = tuple[tuple[str, str | None], ...]


def _param_lookup(params: Params, name: str) -> str | None:
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            return value
    return None


def _format_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def unescape(text: str) -> str:
    """Decode %-escapes (RFC 3261 §19.1.2); octets that are not UTF-8 map to
    lone surrogates (``surrogateescape``) so the result stays comparable and
    nothing is lost. An escaped NUL stays a NUL character (RFC 4475 §3.1.1.4).
    """
    if "%" not in text:
        return text
    return urllib.parse.unquote(text, errors="surrogateescape")


def format_host(host: str) -> str:
    """The host as written in a URI or Via: IPv6 literals get their brackets back."""
    return f"[{host}]" if ":" in host else host


@attrs.frozen
class SipUri:
    """A sip: or sips: URI. ``user`` and parameter values keep their %-escapes."""

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: Params = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def user_unescaped(self) -> str | None:
        """The user part with %-escapes decoded, for comparisons (§19.1.4)."""
        return None if self.user is None else unescape(self.user)

    def param(self, name: str) -> str | None:
        """The value of the first URI parameter of that name (case-insensitive);
        ``""`` is never returned for a flag parameter such as ``lr``: use
        ``has_param``."""
        return _param_lookup(self.params, name)

    def has_param(self, name: str) -> bool:
        """Whether a URI parameter of that name is present (with or without value)."""
        lname = name.lower()
        return any(key.lower() == lname for key, _ in self.params)

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter, lower-cased (§19.1.1), or None."""
        value = self.param("transport")
        return None if value is None else value.lower()

    @property
    def hostport(self) -> str:
        """``host[:port]`` as it would be written in the URI."""
        host = format_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(self.hostport)
        out.append(_format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers))
        return "".join(out)


@attrs.frozen
class TelUri:
    """A tel: URI (RFC 3966): the number as written and its parameters."""

    number: str
    params: Params = ()

    @property
    def scheme(self) -> str:
        """Always "tel" (RFC 3966)."""
        return "tel"

    def param(self, name: str) -> str | None:
        """The value of the first parameter of that name (case-insensitive)."""
        return _param_lookup(self.params, name)

    def __str__(self) -> str:
        return f"tel:{self.number}{_format_params(self.params)}"


@attrs.frozen
class AbsoluteUri:
    """A URI of any other scheme, kept verbatim; ``scheme`` is lower-cased."""

    scheme: str
    text: str

    def __str__(self) -> str:
        return self.text


def _split_params(text: str) -> Params:
    """``;a=b;c`` (already validated by the URI pattern) as (name, value) pairs."""
    out: list[tuple[str, str | None]] = []
    for item in text.split(";")[1:]:
        name, eq, value = item.partition("=")
        out.append((name, value if eq else None))
    return tuple(out)


def _parse_sip(scheme: str, rest: str, text: str) -> SipUri:
    m = _SIP_REST.fullmatch(rest)
    if m is None or _BAD_ESCAPE.search(rest):
        raise ParseError(f"Bad URI: {text[:80]}")
    host = m.group("host")
    if host[0] == "[":
        host = host[1:-1]
        if host.count(":") < 2:
            raise ParseError(f"Bad URI: {text[:80]}")
    port_text = m.group("port")
    port = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise ParseError(f"Bad URI port: {text[:80]}")
    params_text = m.group("params")
    headers_text = m.group("headers")
    headers: tuple[tuple[str, str], ...] = ()
    if headers_text:
        pairs = []
        for item in headers_text.split("&"):
            name, _, value = item.partition("=")
            if not name:
                raise ParseError(f"Bad URI header: {text[:80]}")
            pairs.append((name, value))
        headers = tuple(pairs)
    return SipUri(
        scheme=scheme,
        user=m.group("user"),
        password=m.group("password"),
        host=host,
        port=port,
        params=_split_params(params_text) if params_text else (),
        headers=headers,
    )


def _parse_tel(rest: str, text: str) -> TelUri:
    number, _, params_text = rest.partition(";")
    if not _TEL_NUMBER.fullmatch(number):
        raise ParseError(f"Bad tel URI: {text[:80]}")
    params: Params = ()
    if params_text:
        items = params_text.split(";")
        if not all(_TEL_PARAM.fullmatch(item) for item in items):
            raise ParseError(f"Bad tel URI parameter: {text[:80]}")
        params = _split_params(";" + params_text)
    return TelUri(number=number, params=params)


def parse_uri(text: str) -> SipUri | TelUri | AbsoluteUri:
    """Parse a URI as found in a Request-URI or between ``<`` and ``>``.

    Raises ``ParseError`` (400, "Bad URI ...") when the text is not a URI.
    """
    colon = text.find(":")
    if colon <= 0 or not _SCHEME.fullmatch(text, 0, colon):
        raise ParseError(f"Bad URI: {text[:80]}")
    scheme = text[:colon].lower()
    rest = text[colon + 1 :]
    if scheme in ("sip", "sips"):
        return _parse_sip(scheme, rest, text)
    if scheme == "tel":
        return _parse_tel(rest, text)
    if not rest or _ABSOLUTE_BAD.search(rest):
        raise ParseError(f"Bad URI: {text[:80]}")
    return AbsoluteUri(scheme=scheme, text=text)
