"""Digest authentication: challenges, credentials, verification, nonces.

What this module owns: the ``Digest`` scheme of RFC 3261 §22.4 as defined by
RFC 2617 §3 (MD5, ``qop=auth``/``auth-int`` and the RFC 2069 form without
``qop``), and the SHA-256 algorithm of RFC 7616 §3.4 / RFC 8760 §2, which is
the same computation with another hash. ``*-sess`` algorithms are not offered
by the server and therefore not accepted either.

What it refuses to know: accounts, passwords and the engine's state. The
store holds HA1 (``compute_ha1``), never a password; the engine passes HA1 in.

Nonces are stateless (``NonceFactory``): a wall-clock timestamp and a salt
from the engine's entropy, signed with HMAC-SHA256 under a secret shared by
every process and host, so whichever one sees the retry of a challenged
request can check it. "An INVITE accepts a nonce only once" is the job of
``NonceTracker``, a bounded memory of nonces already used. REGISTER may reuse
a nonce with a growing ``nc`` (Linphone does this for re-REGISTER); since
kx-sipd keeps no binding, a replayed REGISTER changes nothing and the engine
needs no nonce-count memory for it: ``NonceFactory.check`` plus
``verify_response`` is the whole test.

Parsing follows RFC 3261 §25.1 / RFC 2617 §3.2.2: the scheme name and
parameter names are case-insensitive, parameters come in any order, values
are tokens or quoted strings with ``\\`` escapes, linear white space (folded
lines included) may surround every separator, unknown parameters are kept.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import hashlib
import hmac
import re
from collections.abc import Callable

import attrs

from ._errors import ParseError

__all__ = [
    "ALGORITHMS",
    "DigestChallenge",
    "DigestCredentials",
    "NonceFactory",
    "NonceStatus",
    "NonceTracker",
    "UnsupportedScheme",
    "answer_challenge",
    "compute_ha1",
    "compute_response",
    "make_authorization",
    "make_challenge",
    "parse_authorization",
    "parse_challenge",
    "verify_response",
]

ALGORITHMS: tuple[str, ...] = ("MD5", "SHA-256")
"""The digest algorithms this module computes (RFC 2617 §3.2.1, RFC 7616 §3.4)."""

_HASHES: dict[str, Callable[[bytes], hashlib._Hash]] = {
    "MD5": hashlib.md5,
    "SHA-256": hashlib.sha256,
}

_QOP_VALUES = ("auth", "auth-int")

# RFC 3261 §25.1 token characters.
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_LWS = " \t\r\n"
_NC = re.compile(r"[0-9a-fA-F]{8}")  # RFC 2617 §3.2.2: nc-value = 8LHEX


class UnsupportedScheme(ParseError):
    """The header uses an authentication scheme other than Digest (Basic,
    Bearer, ...). RFC 3261 §22.1 forbids Basic; the engine's right answer is
    a fresh Digest challenge (401), so it can catch this class apart from
    other parse errors. Its default status is 400 for callers that do not."""


def _canonical_algorithm(name: str) -> str:
    """The canonical spelling of a known algorithm name (any case); others as sent."""
    for known in ALGORITHMS:
        if name.upper() == known:
            return known
    return name


def _hash_hex(algorithm: str, data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _HASHES[algorithm](data).hexdigest()


def _require_algorithm(algorithm: str) -> str:
    canonical = _canonical_algorithm(algorithm)
    if canonical not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return canonical


def compute_ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """HA1 = H(username ":" realm ":" password) in lower-case hex (RFC 2617
    §3.2.2.2; RFC 7616 §3.4.2). Text is hashed as UTF-8 (RFC 7616 §3.4.4
    charset=UTF-8). Raises ValueError for an algorithm not in ``ALGORITHMS``."""
    canonical = _require_algorithm(algorithm)
    return _hash_hex(canonical, f"{username}:{realm}:{password}")


def compute_response(
    *,
    ha1: str,
    method: str,
    uri: str,
    nonce: str,
    algorithm: str = "MD5",
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The request-digest of RFC 2617 §3.2.2.1 (RFC 7616 §3.4.1), lower-case hex.

    Without ``qop`` this is the RFC 2069 form ``H(HA1:nonce:HA2)``; with
    ``qop="auth"`` it is ``H(HA1:nonce:nc:cnonce:qop:HA2)``; ``qop="auth-int"``
    also hashes ``body`` into HA2. Used by the server to check and by a
    client (tests, the B-leg) to answer. Raises ValueError for an unsupported
    algorithm or qop, or a qop without ``nc`` and ``cnonce``.
    """
    canonical = _require_algorithm(algorithm)
    if qop is None:
        ha2 = _hash_hex(canonical, f"{method}:{uri}")
        return _hash_hex(canonical, f"{ha1}:{nonce}:{ha2}")
    if qop not in _QOP_VALUES:
        raise ValueError(f"unsupported qop {qop!r}")
    if nc is None or cnonce is None:
        raise ValueError("qop requires nc and cnonce")
    if qop == "auth-int":
        ha2 = _hash_hex(canonical, f"{method}:{uri}:{_hash_hex(canonical, body)}")
    else:
        ha2 = _hash_hex(canonical, f"{method}:{uri}")
    return _hash_hex(canonical, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# -- header parsing ---------------------------------------------------------


# A fold (CRLF then white space, RFC 3261 §7.3.1) counts as one space.
_FOLD = re.compile(r"(?:\r\n|\r|\n)+[ \t]+")
_TOKEN_RE = re.compile(r"[ \t\r\n]*([A-Za-z0-9\-.!%*_+`'~]+)")
_SEPARATORS = re.compile(r"[ \t\r\n,]*")
# Separators (commas, LWS), then name = value, then a comma or the end. The value is a quoted-string
# (RFC 3261 §25.1: qdtext or quoted-pair, no CTLs), a single-quoted string
# (Ekiga 3.2.7 quotes every Digest value that way, see
# shared/testdata/softphones/ekiga-3.2.7-*.sip: accepting it costs nothing,
# a wrong value only fails to verify), or a bare run of visible characters
# (a token, or the bare URI some clients send).
_PARAM = re.compile(
    r"[ \t\r\n,]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t\r\n]*=[ \t\r\n]*"
    r'(?:"((?:[^"\\\x00-\x08\x0a-\x1f\x7f]++|\\[^\x00-\x08\x0a-\x1f\x7f])*+)"'
    r"|'([^'\x00-\x08\x0a-\x1f\x7f]*)'"
    r'|([^ \t\r\n,"\x00-\x1f\x7f]++))'
    r"[ \t\r\n]*(?:,|\Z)"
)
_QUOTED_PAIR = re.compile(r"\\(.)")


def _parse_params(value: str, what: str) -> tuple[tuple[str, str], ...]:
    """Split ``Digest a=b, c="d"`` into ((name, value), ...), names lower-cased.

    Raises ``UnsupportedScheme`` for another scheme. Empty list elements
    (",,") are allowed by the #rule of RFC 2616 §2.1. A parameter given
    twice is refused: two values for ``response`` or ``nonce`` leave no safe
    choice (RFC 7616 §3.4: each directive at most once).
    """
    if "\r" in value or "\n" in value:
        value = _FOLD.sub(" ", value)
    scheme = _TOKEN_RE.match(value)
    if scheme is None:
        raise ParseError(f"Bad {what} header")
    if scheme.group(1).lower() != "digest":
        raise UnsupportedScheme(f"Unsupported {what} scheme")
    pos = scheme.end()
    n = len(value)
    if pos < n and value[pos] not in _LWS:
        raise ParseError(f"Bad {what} header")
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    while True:
        # Separators and the next parameter in one match; when it fails, the
        # rest must be separators only (the end of the list).
        match = _PARAM.match(value, pos)
        if match is None:
            if _SEPARATORS.fullmatch(value, pos):
                break
            raise ParseError(f"Bad {what} header")
        name, quoted, single, bare = match.groups()
        name = name.lower()
        if quoted is not None:
            param_value = _QUOTED_PAIR.sub(r"\1", quoted) if "\\" in quoted else quoted
        else:
            param_value = single if single is not None else bare
        if name in seen:
            raise ParseError(f"Duplicate {name} in {what} header")
        seen.add(name)
        params.append((name, param_value))
        pos = match.end()
    if not params:
        raise ParseError(f"Bad {what} header")
    return tuple(params)


@attrs.frozen(kw_only=True)
class DigestCredentials:
    """A parsed ``Authorization`` / ``Proxy-Authorization`` value (RFC 2617 §3.2.2).

    ``algorithm`` is canonical ("MD5", "SHA-256") when known, else as sent;
    ``params`` holds every parameter, names lower-cased, values unquoted.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None
    params: tuple[tuple[str, str], ...] = ()


def parse_authorization(value: str, *, header: str = "Authorization") -> DigestCredentials:
    """Parse an Authorization (or Proxy-Authorization) header value.

    Raises ``UnsupportedScheme`` (a ParseError, status 400) for a scheme other
    than Digest, and ``ParseError(reason, 400)`` for bad syntax ("Bad
    Authorization header"), a missing directive ("Missing nonce"), a
    duplicated one, or a ``qop`` without ``nc``/``cnonce`` (RFC 2617 §3.2.2:
    they MUST be present with qop). ``nc`` must be 8 hex digits.
    """
    params = _parse_params(value, header)
    found = dict(params)
    for required in ("username", "realm", "nonce", "uri", "response"):
        if required not in found:
            raise ParseError(f"Missing {required}")
    qop = found.get("qop")
    nc = found.get("nc")
    cnonce = found.get("cnonce")
    if qop is not None:
        if nc is None:
            raise ParseError("Missing nc")
        if cnonce is None:
            raise ParseError("Missing cnonce")
    if nc is not None and not _NC.fullmatch(nc):
        raise ParseError(f"Bad nc in {header} header")
    return DigestCredentials(
        username=found["username"],
        realm=found["realm"],
        nonce=found["nonce"],
        uri=found["uri"],
        response=found["response"],
        algorithm=_canonical_algorithm(found.get("algorithm", "MD5")),
        qop=qop,
        nc=nc,
        cnonce=cnonce,
        opaque=found.get("opaque"),
        params=params,
    )


@attrs.frozen(kw_only=True)
class DigestChallenge:
    """A parsed ``WWW-Authenticate`` / ``Proxy-Authenticate`` value (RFC 2617 §3.2.1).

    ``qop`` is the unquoted qop-options list as sent ("auth" or "auth,auth-int");
    ``qop_options`` splits it.
    """

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: str | None = None
    stale: bool = False
    opaque: str | None = None
    params: tuple[tuple[str, str], ...] = ()

    @property
    def qop_options(self) -> tuple[str, ...]:
        """The qop values offered ("auth", "auth-int"), in order; () when none."""
        if self.qop is None:
            return ()
        return tuple(part.strip() for part in self.qop.split(",") if part.strip())


def parse_challenge(value: str, *, header: str = "WWW-Authenticate") -> DigestChallenge:
    """Parse a WWW-Authenticate (or Proxy-Authenticate) Digest challenge.

    Raises ``UnsupportedScheme`` for another scheme and ``ParseError`` for bad
    syntax or a missing realm/nonce. ``stale`` is true only for the value
    "true", case-insensitively (RFC 2617 §3.2.1).
    """
    params = _parse_params(value, header)
    found = dict(params)
    for required in ("realm", "nonce"):
        if required not in found:
            raise ParseError(f"Missing {required}")
    return DigestChallenge(
        realm=found["realm"],
        nonce=found["nonce"],
        algorithm=_canonical_algorithm(found.get("algorithm", "MD5")),
        qop=found.get("qop"),
        stale=found.get("stale", "").lower() == "true",
        opaque=found.get("opaque"),
        params=params,
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _token_or_quoted(text: str) -> str:
    """A token as is; anything else (only a peer's odd value) as a quoted-string."""
    if text and all(c in _TOKEN_CHARS for c in text):
        return text
    return _quote(text)


def make_challenge(
    *,
    realm: str,
    nonce: str,
    algorithm: str = "MD5",
    qop: str | None = "auth",
    stale: bool = False,
    opaque: str | None = None,
) -> str:
    """The WWW-Authenticate value, in the form every softphone accepts:
    ``Digest realm="sip.kx21.com", nonce="...", algorithm=MD5, qop="auth"``
    then ``, opaque="..."`` and ``, stale=true`` when given.

    ``algorithm`` is a bare token and ``qop`` a quoted string, as RFC 2617
    §3.2.1 writes them (some clients refuse ``algorithm="MD5"``).
    """
    canonical = _require_algorithm(algorithm)
    parts = [f"Digest realm={_quote(realm)}", f"nonce={_quote(nonce)}", f"algorithm={canonical}"]
    if qop is not None:
        parts.append(f"qop={_quote(qop)}")
    if opaque is not None:
        parts.append(f"opaque={_quote(opaque)}")
    if stale:
        parts.append("stale=true")
    return ", ".join(parts)


def make_authorization(credentials: DigestCredentials) -> str:
    """Serialise credentials as an Authorization value (RFC 2617 §3.2.2 order).

    ``algorithm``, ``qop`` and ``nc`` are written as tokens (RFC 7616 §3.4:
    "a sender MUST NOT generate the quoted string syntax" for them), unless
    a value copied from a peer is not a token, which only quoting preserves.
    """
    parts = [
        f"Digest username={_quote(credentials.username)}",
        f"realm={_quote(credentials.realm)}",
        f"nonce={_quote(credentials.nonce)}",
        f"uri={_quote(credentials.uri)}",
        f"response={_quote(credentials.response)}",
        f"algorithm={_token_or_quoted(credentials.algorithm)}",
    ]
    if credentials.cnonce is not None:
        parts.append(f"cnonce={_quote(credentials.cnonce)}")
    if credentials.opaque is not None:
        parts.append(f"opaque={_quote(credentials.opaque)}")
    if credentials.qop is not None:
        parts.append(f"qop={_token_or_quoted(credentials.qop)}")
    if credentials.nc is not None:
        parts.append(f"nc={credentials.nc}")
    return ", ".join(parts)


def answer_challenge(
    challenge: DigestChallenge,
    *,
    username: str,
    ha1: str,
    method: str,
    uri: str,
    cnonce: str,
    nc: int = 1,
    body: bytes = b"",
) -> DigestCredentials:
    """Client side: the credentials answering ``challenge`` (tests, and a
    B-leg challenged by a carrier). Picks qop "auth" when offered, else
    "auth-int", else the RFC 2069 form. ``ha1`` must be for the challenge's
    realm and algorithm. Raises ValueError for an unsupported algorithm."""
    options = challenge.qop_options
    qop: str | None = None
    if "auth" in options:
        qop = "auth"
    elif "auth-int" in options:
        qop = "auth-int"
    nc_text = f"{nc:08x}" if qop is not None else None
    cnonce_value = cnonce if qop is not None else None
    response = compute_response(
        ha1=ha1,
        method=method,
        uri=uri,
        nonce=challenge.nonce,
        algorithm=challenge.algorithm,
        qop=qop,
        nc=nc_text,
        cnonce=cnonce_value,
        body=body,
    )
    return DigestCredentials(
        username=username,
        realm=challenge.realm,
        nonce=challenge.nonce,
        uri=uri,
        response=response,
        algorithm=_require_algorithm(challenge.algorithm),
        qop=qop,
        nc=nc_text,
        cnonce=cnonce_value,
        opaque=challenge.opaque,
    )


def verify_response(
    credentials: DigestCredentials,
    *,
    ha1: str,
    method: str,
    realm: str | None = None,
    body: bytes = b"",
) -> bool:
    """True when ``credentials.response`` is the right digest for ``method``.

    ``credentials.uri`` is the digest-uri (RFC 2617 §3.2.2.5: the server
    should also check that it names the Request-URI; the engine does that).
    ``ha1`` must be the account's HA1 for ``credentials.algorithm``.
    ``realm``, when given, must equal the credentials' realm. An unknown
    algorithm or qop gives False, never an exception. The comparison is
    constant-time (hmac.compare_digest); hex case is ignored.
    """
    if realm is not None and credentials.realm != realm:
        return False
    if credentials.algorithm not in _HASHES:
        return False
    if credentials.qop is not None and credentials.qop not in _QOP_VALUES:
        return False
    try:
        expected = compute_response(
            ha1=ha1,
            method=method,
            uri=credentials.uri,
            nonce=credentials.nonce,
            algorithm=credentials.algorithm,
            qop=credentials.qop,
            nc=credentials.nc,
            cnonce=credentials.cnonce,
            body=body,
        )
    except ValueError:
        return False
    given = credentials.response.lower().encode("utf-8", "surrogatepass")
    return hmac.compare_digest(expected.encode("ascii"), given)


# -- nonces -----------------------------------------------------------------


class NonceStatus(enum.Enum):
    """What ``NonceFactory.check`` concluded about a nonce."""

    VALID = "valid"
    STALE = "stale"  # genuine but expired: answer 401 with stale=true (RFC 2617 §3.2.1)
    INVALID = "invalid"  # not ours: forged, mangled, or from the future


NONCE_SKEW = 10.0
"""Seconds a nonce's timestamp may lie in the future: hosts sharing the secret
have NTP-synchronised but not identical clocks. Beyond this it is INVALID."""

_MAC_SIZE = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 §5 allows ≥ half)
_SHA256_BLOCK = 64  # bytes (RFC 2104 §2: B)
_IPAD = bytes(x ^ 0x36 for x in range(256))  # translate tables: each key byte XOR ipad / opad
_OPAD = bytes(x ^ 0x5C for x in range(256))
_MAX_SALT = 32
_STAMP_SIZE = 5  # whole seconds, big-endian: enough until the year 36812


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes | None:
    if not text or len(text) > 128 or len(text) % 4 == 1:
        return None
    if not _B64URL_TEXT.fullmatch(text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


_B64URL_TEXT = re.compile(r"[A-Za-z0-9_-]*")


class NonceFactory:
    """Stateless nonces: base64url(timestamp ‖ salt ‖ HMAC-SHA256(secret, timestamp ‖ salt)[:16]).

    The timestamp is whole wall-clock seconds (5 bytes, big-endian), so any
    process or host holding the secret can check a nonce another one issued
    (DESIGN §4). With the usual 8-byte salt a nonce is 39 characters of
    ``[A-Za-z0-9_-]``: nothing needs escaping in a quoted-string and it fits
    the fixed buffers of small softphones.
    """

    def __init__(self, secret: bytes, *, lifetime: float = 300.0) -> None:
        if len(secret) < 16:
            raise ValueError("nonce secret must be at least 16 bytes")
        if lifetime <= 0:
            raise ValueError("nonce lifetime must be positive")
        self._secret = secret
        self.lifetime = lifetime
        # HMAC (RFC 2104) with its two keyed hash states computed once: each
        # MAC then copies them instead of keying a new HMAC object (half the
        # cost of hmac.new per nonce made or checked).
        key = secret if len(secret) <= _SHA256_BLOCK else hashlib.sha256(secret).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def _mac(self, payload: bytes) -> bytes:
        """HMAC-SHA256(secret, payload), truncated to ``_MAC_SIZE`` bytes."""
        inner = self._inner.copy()
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_SIZE]

    def make(self, *, wall: float, salt: bytes) -> str:
        """A fresh nonce stamped ``wall`` (seconds since the epoch). ``salt``
        comes from the engine's entropy (8 bytes is plenty; at most 32)."""
        if len(salt) > _MAX_SALT:
            raise ValueError("salt is longer than 32 bytes")
        payload = max(0, int(wall)).to_bytes(_STAMP_SIZE, "big") + salt
        return _b64url(payload + self._mac(payload))

    def check(self, nonce: str, *, wall: float) -> NonceStatus:
        """VALID, STALE (genuine, older than ``lifetime``) or INVALID (bad
        format, bad MAC, or stamped more than ``NONCE_SKEW`` seconds ahead)."""
        raw = _unb64url(nonce)
        if raw is None or len(raw) < _STAMP_SIZE + _MAC_SIZE:
            return NonceStatus.INVALID
        payload, mac = raw[:-_MAC_SIZE], raw[-_MAC_SIZE:]
        if len(payload) - _STAMP_SIZE > _MAX_SALT:
            return NonceStatus.INVALID
        if not hmac.compare_digest(mac, self._mac(payload)):
            return NonceStatus.INVALID
        stamp = int.from_bytes(payload[:_STAMP_SIZE], "big")
        if stamp > wall + NONCE_SKEW:
            return NonceStatus.INVALID
        if wall - stamp > self.lifetime:
            return NonceStatus.STALE
        return NonceStatus.VALID


class NonceTracker:
    """Bounded single-use memory: "an INVITE accepts a nonce only once".

    Call ``use`` only after ``NonceFactory.check`` said VALID and the response
    verified: then only clients that know a password can add entries, and a
    forged nonce never occupies a slot.

    Eviction rule. An entry is kept ``lifetime + NONCE_SKEW`` seconds after
    its first use. A nonce used at time u was stamped at most NONCE_SKEW
    ahead of u, so after that time ``NonceFactory.check`` calls it STALE and
    a replay is refused there; forgetting it is safe. (Pass the factory's
    lifetime.) When the wall clock steps back, entries live longer (safe);
    when it steps forward, entries go early, but the same clock makes their
    nonces STALE, so that is safe too.

    Overflow rule. When ``capacity`` entries are all still fresh, ``use``
    refuses (returns False) instead of evicting the oldest: evicting a fresh
    entry would let a replay of that nonce through while the factory still
    calls it VALID. Refusing costs the client one extra 401 with a fresh
    nonce (stale=true), never a replay. Entries are removed oldest-first as
    they expire, which frees room within ``lifetime + NONCE_SKEW``.
    """

    def __init__(self, *, capacity: int = 100_000, lifetime: float = 300.0) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if lifetime <= 0:
            raise ValueError("lifetime must be positive")
        self.capacity = capacity
        self.lifetime = lifetime
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._refused = 0

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def refused_full(self) -> int:
        """How many first uses were refused because the tracker was full (a metric)."""
        return self._refused

    def expire(self, *, wall: float) -> None:
        """Forget entries whose nonce is stale by now (first use + lifetime + skew)."""
        keep = self.lifetime + NONCE_SKEW
        seen = self._seen
        while seen:
            nonce, first_use = next(iter(seen.items()))
            if wall - first_use <= keep:
                break
            del seen[nonce]

    def use(self, nonce: str, *, wall: float) -> bool:
        """True the first time ``nonce`` is used; False when it was used
        before (a replay) or when the tracker is full of fresh entries."""
        self.expire(wall=wall)
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            self._refused += 1
            return False
        # Insertion order is first-use order; a wall clock that steps back
        # makes a later entry look older than an earlier one, which only
        # delays expiry of the entries behind it (safe, see class docs).
        self._seen[nonce] = wall
        return True
