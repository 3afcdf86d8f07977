"""Digest authentication (sansio_sip._digest): RFC vectors, parsing, nonces."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sansio_sip import ParseError
from sansio_sip._digest import (
    ALGORITHMS,
    NONCE_SKEW,
    DigestChallenge,
    DigestCredentials,
    NonceFactory,
    NonceStatus,
    NonceTracker,
    UnsupportedScheme,
    answer_challenge,
    compute_ha1,
    compute_response,
    make_authorization,
    make_challenge,
    parse_authorization,
    parse_challenge,
    verify_response,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "digest"
TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"
VECTOR_FILES = sorted(VECTORS.glob("*.json"))
SECRET = b"k" * 32


def load(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def test_vectors_exist_and_name_their_source() -> None:
    assert len(VECTOR_FILES) >= 4
    for path in VECTOR_FILES:
        assert "RFC" in str(load(path)["source"])


# -- RFC vectors ------------------------------------------------------------


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_vector_parses_and_verifies(path: Path) -> None:
    vector = load(path)
    expected = vector["expected"]
    assert isinstance(expected, dict)
    creds = parse_authorization(str(vector["authorization"]))
    for name, value in expected.items():
        assert getattr(creds, name) == value, name
    ha1 = compute_ha1(creds.username, creds.realm, str(vector["password"]), creds.algorithm)
    assert verify_response(creds, ha1=ha1, method=str(vector["method"]))
    # The same numbers computed from scratch, the client's way.
    assert (
        compute_response(
            ha1=ha1,
            method=str(vector["method"]),
            uri=creds.uri,
            nonce=creds.nonce,
            algorithm=creds.algorithm,
            qop=creds.qop,
            nc=creds.nc,
            cnonce=creds.cnonce,
        )
        == expected["response"]
    )


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_vector_fails_with_wrong_password_method_or_realm(path: Path) -> None:
    vector = load(path)
    creds = parse_authorization(str(vector["authorization"]))
    password = str(vector["password"])
    right = compute_ha1(creds.username, creds.realm, password, creds.algorithm)
    wrong_pw = compute_ha1(creds.username, creds.realm, password + "x", creds.algorithm)
    wrong_realm = compute_ha1(creds.username, "sip.kx21.com", password, creds.algorithm)
    assert not verify_response(creds, ha1=wrong_pw, method="GET")
    assert not verify_response(creds, ha1=wrong_realm, method="GET")
    assert not verify_response(creds, ha1=right, method="POST")
    assert not verify_response(creds, ha1=right, method="GET", realm="sip.kx21.com")
    assert verify_response(creds, ha1=right, method="GET", realm=creds.realm)


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_vector_challenge_answered_by_client_side(path: Path) -> None:
    vector = load(path)
    expected = vector["expected"]
    assert isinstance(expected, dict)
    challenge = parse_challenge(str(vector["challenge"]))
    ha1 = compute_ha1("Mufasa", challenge.realm, str(vector["password"]), challenge.algorithm)
    creds = answer_challenge(
        challenge,
        username="Mufasa",
        ha1=ha1,
        method=str(vector["method"]),
        uri="/dir/index.html",
        cnonce=str(expected["cnonce"]) if expected["cnonce"] else "unused",
    )
    assert creds.response == expected["response"]
    assert creds.qop == expected["qop"]
    # what we write, we read back identically
    again = parse_authorization(make_authorization(creds))
    assert attrs_without_params(again) == attrs_without_params(creds)


def attrs_without_params(creds: DigestCredentials) -> tuple[object, ...]:
    return (
        creds.username,
        creds.realm,
        creds.nonce,
        creds.uri,
        creds.response,
        creds.algorithm,
        creds.qop,
        creds.nc,
        creds.cnonce,
        creds.opaque,
    )


def test_rfc2617_ha1_and_sha256_same_path() -> None:
    assert compute_ha1("Mufasa", "testrealm@host.com", "Circle Of Life") == (
        "939e7578ed9e3c518a452acee763bce9"
    )
    md5 = compute_ha1("u", "r", "p", "MD5")
    sha = compute_ha1("u", "r", "p", "sha-256")
    assert len(md5) == 32 and len(sha) == 64
    assert ALGORITHMS == ("MD5", "SHA-256")
    with pytest.raises(ValueError):
        compute_ha1("u", "r", "p", "SHA-512-256")


def test_auth_int_hashes_the_body() -> None:
    ha1 = compute_ha1("alice", "sip.kx21.com", "pw")
    args = dict(ha1=ha1, method="INVITE", uri="sip:1@x", nonce="n", nc="00000001", cnonce="c")
    a = compute_response(**args, qop="auth-int", body=b"v=0\r\n")
    b = compute_response(**args, qop="auth-int", body=b"v=1\r\n")
    c = compute_response(**args, qop="auth", body=b"v=0\r\n")
    assert len({a, b, c}) == 3
    creds = DigestCredentials(
        username="alice",
        realm="sip.kx21.com",
        nonce="n",
        uri="sip:1@x",
        response=a,
        qop="auth-int",
        nc="00000001",
        cnonce="c",
    )
    assert verify_response(creds, ha1=ha1, method="INVITE", body=b"v=0\r\n")
    assert not verify_response(creds, ha1=ha1, method="INVITE", body=b"v=1\r\n")


def test_compute_response_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        compute_response(ha1="a", method="X", uri="u", nonce="n", qop="auth")
    with pytest.raises(ValueError):
        compute_response(ha1="a", method="X", uri="u", nonce="n", qop="x", nc="1", cnonce="c")
    with pytest.raises(ValueError):
        compute_response(ha1="a", method="X", uri="u", nonce="n", algorithm="MD4")


def sip_credentials(**overrides: str | None) -> DigestCredentials:
    fields: dict[str, str | None] = dict(
        username="acme",
        realm="sip.kx21.com",
        nonce="abc",
        uri="sip:17752180264@sip.kx21.com",
        qop="auth",
        nc="00000001",
        cnonce="xyz",
        algorithm="MD5",
    )
    fields.update(overrides)
    ha1 = compute_ha1("acme", "sip.kx21.com", "secret", str(fields["algorithm"]))
    response = compute_response(
        ha1=ha1,
        method="INVITE",
        uri=str(fields["uri"]),
        nonce=str(fields["nonce"]),
        algorithm=str(fields["algorithm"]),
        qop=fields["qop"],
        nc=fields["nc"],
        cnonce=fields["cnonce"],
    )
    return DigestCredentials(response=response, **fields)  # type: ignore[arg-type]


def test_verify_uppercase_hex_and_odd_inputs_never_raise() -> None:
    ha1 = compute_ha1("acme", "sip.kx21.com", "secret")
    good = sip_credentials()
    upper = DigestCredentials(**{**_fields(good), "response": good.response.upper()})
    assert verify_response(upper, ha1=ha1, method="INVITE")
    for response in ("", "zz", "é" * 32, "\udcff"):
        odd = DigestCredentials(**{**_fields(good), "response": response})
        assert not verify_response(odd, ha1=ha1, method="INVITE")
    unknown_alg = DigestCredentials(**{**_fields(good), "algorithm": "MD5-sess"})
    assert not verify_response(unknown_alg, ha1=ha1, method="INVITE")
    unknown_qop = DigestCredentials(**{**_fields(good), "qop": "auth-conf"})
    assert not verify_response(unknown_qop, ha1=ha1, method="INVITE")
    no_nc = DigestCredentials(**{**_fields(good), "nc": None})
    assert not verify_response(no_nc, ha1=ha1, method="INVITE")


def _fields(creds: DigestCredentials) -> dict[str, object]:
    import attrs

    return attrs.asdict(creds, recurse=False)


def test_verify_uses_credentials_uri_and_nonce() -> None:
    ha1 = compute_ha1("acme", "sip.kx21.com", "secret")
    good = sip_credentials()
    assert verify_response(good, ha1=ha1, method="INVITE")
    for change in ({"uri": "sip:other@x"}, {"nonce": "abd"}, {"nc": "00000002"}, {"cnonce": "q"}):
        bad = DigestCredentials(**{**_fields(good), **change})
        assert not verify_response(bad, ha1=ha1, method="INVITE"), change


def test_sha256_is_the_same_code_path() -> None:
    ha1 = compute_ha1("acme", "sip.kx21.com", "secret", "SHA-256")
    creds = sip_credentials(algorithm="SHA-256")
    assert len(creds.response) == 64
    assert verify_response(creds, ha1=ha1, method="INVITE")
    md5_ha1 = compute_ha1("acme", "sip.kx21.com", "secret", "MD5")
    assert not verify_response(creds, ha1=md5_ha1, method="INVITE")


# -- header parsing ---------------------------------------------------------

BASE = (
    'username="acme", realm="sip.kx21.com", nonce="n1", uri="sip:1@sip.kx21.com", '
    'response="0123456789abcdef0123456789abcdef"'
)


@pytest.mark.parametrize(
    "value",
    [
        "Digest " + BASE,
        "digest " + BASE,
        "DIGEST   " + BASE.replace(", ", " ,\t"),
        "Digest " + BASE.replace(", ", ",\r\n "),  # folded continuation lines
        "Digest\r\n " + BASE,
        "  Digest " + BASE + "  ",
        "Digest " + BASE.replace("=", " = "),
        "Digest " + ", ".join(reversed(BASE.split(", "))),
        "Digest " + BASE.replace("username", "UserName").replace("nonce", "NONCE"),
        "Digest " + BASE + ', unknown=token, other="q"',
        "Digest ," + BASE + ",,",
    ],
)
def test_authorization_tolerances(value: str) -> None:
    creds = parse_authorization(value)
    assert creds.username == "acme"
    assert creds.realm == "sip.kx21.com"
    assert creds.nonce == "n1"
    assert creds.uri == "sip:1@sip.kx21.com"
    assert creds.response == "0123456789abcdef0123456789abcdef"
    assert creds.algorithm == "MD5"
    assert creds.qop is None and creds.nc is None and creds.cnonce is None


def test_authorization_escapes_unknown_params_and_case() -> None:
    creds = parse_authorization(
        r'Digest username="a\"b\\c", realm="sip.kx21.com", nonce="n", uri="sip:x", '
        'response="r", algorithm=md5, QOP=auth, Nc=0000000A, cnonce="c,d", '
        'opaque="", X-Extra="1"'
    )
    assert creds.username == 'a"b\\c'
    assert creds.algorithm == "MD5"
    assert creds.qop == "auth"
    assert creds.nc == "0000000A"
    assert creds.cnonce == "c,d"
    assert creds.opaque == ""
    assert ("x-extra", "1") in creds.params
    assert [name for name, _ in creds.params][-1] == "x-extra"


def test_authorization_unquoted_uri_and_sha256_token() -> None:
    creds = parse_authorization(
        "Digest username=acme, realm=sip.kx21.com, nonce=n, uri=sip:1@x;user=phone, "
        "response=abc, algorithm=SHA-256"
    )
    assert creds.uri == "sip:1@x;user=phone"
    assert creds.algorithm == "SHA-256"


def test_ekiga_single_quotes_are_read() -> None:
    raw = (TESTDATA / "softphones" / "ekiga-3.2.7-register-bad-contact.sip").read_bytes().decode()
    line = next(x for x in raw.split("\r\n") if x.startswith("Authorization:"))
    creds = parse_authorization(line.split(":", 1)[1])
    assert creds.username == "twolmsted"
    assert creds.realm == "sipsorcery.com"
    assert creds.uri == "sip:sip.sipsorcery.com"
    assert creds.response == "e9e190a05c482e0c287829ecf6d42207"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "Bad Authorization header"),
        ("Digest", "Bad Authorization header"),
        ("Digest   ", "Bad Authorization header"),
        ("Digest username", "Bad Authorization header"),
        ("Digest username=", "Bad Authorization header"),
        ('Digest username="acme', "Bad Authorization header"),
        ('Digest username="acme\\', "Bad Authorization header"),
        ('Digest username="ac\x00me", ' + BASE[17:], "Bad Authorization header"),
        ('Digest username="acme" realm="r"', "Bad Authorization header"),
        ("Digest =x", "Bad Authorization header"),
        ('Digestusername="a"', "Unsupported Authorization scheme"),
        ('Digest username="a" "b"', "Bad Authorization header"),
        ("Digest " + BASE.replace('nonce="n1", ', ""), "Missing nonce"),
        ("Digest " + BASE.replace('username="acme", ', ""), "Missing username"),
        ("Digest " + BASE.replace('realm="sip.kx21.com", ', ""), "Missing realm"),
        ("Digest " + BASE.replace('uri="sip:1@sip.kx21.com", ', ""), "Missing uri"),
        (
            "Digest " + BASE.replace(', response="0123456789abcdef0123456789abcdef"', ""),
            "Missing response",
        ),
        ("Digest " + BASE + ", qop=auth", "Missing nc"),
        ("Digest " + BASE + ", qop=auth, nc=00000001", "Missing cnonce"),
        ("Digest " + BASE + ', qop=auth, nc=1, cnonce="c"', "Bad nc in Authorization header"),
        (
            "Digest " + BASE + ', qop=auth, nc=0000000g, cnonce="c"',
            "Bad nc in Authorization header",
        ),
        ("Digest " + BASE + ', nonce="n2"', "Duplicate nonce in Authorization header"),
        ("Digest " + BASE + ', Response="0"', "Duplicate response in Authorization header"),
    ],
)
def test_authorization_errors(value: str, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_authorization(value)
    assert info.value.reason == reason
    assert info.value.status_code == 400


@pytest.mark.parametrize("scheme", ["Basic", "Bearer", "NTLM", "basic"])
def test_other_schemes_are_unsupported(scheme: str) -> None:
    with pytest.raises(UnsupportedScheme) as info:
        parse_authorization(f"{scheme} QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
    assert isinstance(info.value, ParseError)
    assert info.value.status_code == 400
    with pytest.raises(UnsupportedScheme):
        parse_challenge(f'{scheme} realm="x"')


def test_proxy_authorization_names_its_header() -> None:
    with pytest.raises(ParseError) as info:
        parse_authorization("Digest x", header="Proxy-Authorization")
    assert info.value.reason == "Bad Proxy-Authorization header"


# -- challenges -------------------------------------------------------------


def test_make_challenge_form() -> None:
    assert make_challenge(realm="sip.kx21.com", nonce="abc") == (
        'Digest realm="sip.kx21.com", nonce="abc", algorithm=MD5, qop="auth"'
    )
    assert make_challenge(realm="sip.kx21.com", nonce="abc", stale=True, opaque="o") == (
        'Digest realm="sip.kx21.com", nonce="abc", algorithm=MD5, qop="auth", '
        'opaque="o", stale=true'
    )
    assert make_challenge(realm="r", nonce="n", algorithm="sha-256", qop=None) == (
        'Digest realm="r", nonce="n", algorithm=SHA-256'
    )
    with pytest.raises(ValueError):
        make_challenge(realm="r", nonce="n", algorithm="MD5-sess")


def test_challenge_round_trip_with_escapes() -> None:
    text = make_challenge(realm='we"ird\\realm', nonce="n", stale=True, opaque="o")
    challenge = parse_challenge(text)
    assert challenge == DigestChallenge(
        realm='we"ird\\realm',
        nonce="n",
        algorithm="MD5",
        qop="auth",
        stale=True,
        opaque="o",
        params=challenge.params,
    )
    assert challenge.qop_options == ("auth",)


def test_parse_challenge_details() -> None:
    c = parse_challenge('Digest realm="r", nonce="n", qop="auth, auth-int", stale=TRUE')
    assert c.qop_options == ("auth", "auth-int")
    assert c.stale is True
    assert parse_challenge('Digest realm="r", nonce="n", stale=false').stale is False
    assert parse_challenge('Digest realm="r", nonce="n"').qop_options == ()
    with pytest.raises(ParseError, match="Missing nonce"):
        parse_challenge('Digest realm="r"')
    with pytest.raises(ParseError, match="Bad WWW-Authenticate header"):
        parse_challenge('Digest realm="r')


def test_answer_challenge_prefers_auth_and_falls_back() -> None:
    ha1 = compute_ha1("acme", "r", "pw")
    only_int = parse_challenge('Digest realm="r", nonce="n", qop="auth-int"')
    creds = answer_challenge(
        only_int, username="acme", ha1=ha1, method="INVITE", uri="sip:x", cnonce="c", body=b"b"
    )
    assert creds.qop == "auth-int" and creds.nc == "00000001"
    assert verify_response(creds, ha1=ha1, method="INVITE", body=b"b")
    legacy = parse_challenge('Digest realm="r", nonce="n"')
    creds = answer_challenge(
        legacy, username="acme", ha1=ha1, method="BYE", uri="sip:x", cnonce="c"
    )
    assert creds.qop is None and creds.cnonce is None and creds.nc is None
    assert verify_response(creds, ha1=ha1, method="BYE")
    both = parse_challenge('Digest realm="r", nonce="n", qop="auth-int,auth"')
    creds = answer_challenge(
        both, username="acme", ha1=ha1, method="INVITE", uri="sip:x", cnonce="c", nc=255
    )
    assert creds.qop == "auth" and creds.nc == "000000ff"


# -- nonces -----------------------------------------------------------------

WALL = 1_750_000_000.0


def test_nonce_is_compact_and_quotable() -> None:
    factory = NonceFactory(SECRET)
    nonce = factory.make(wall=WALL, salt=b"\x00\xff" * 4)
    assert len(nonce) <= 40
    assert all(c.isalnum() or c in "-_" for c in nonce)
    challenge = parse_challenge(make_challenge(realm="r", nonce=nonce))
    assert challenge.nonce == nonce


def test_nonce_lifecycle() -> None:
    factory = NonceFactory(SECRET, lifetime=300.0)
    nonce = factory.make(wall=WALL, salt=b"12345678")
    assert factory.check(nonce, wall=WALL) is NonceStatus.VALID
    assert factory.check(nonce, wall=WALL + 300) is NonceStatus.VALID
    assert factory.check(nonce, wall=WALL + 301) is NonceStatus.STALE
    assert factory.check(nonce, wall=WALL + 10_000_000) is NonceStatus.STALE
    # a nonce from the future (another host's clock far ahead, or forged) is not ours
    assert factory.check(nonce, wall=WALL - NONCE_SKEW) is NonceStatus.VALID
    assert factory.check(nonce, wall=WALL - NONCE_SKEW - 2) is NonceStatus.INVALID


def test_nonce_verifies_on_another_instance_with_the_secret_only() -> None:
    nonce = NonceFactory(SECRET).make(wall=WALL, salt=b"abcdefgh")
    assert NonceFactory(SECRET).check(nonce, wall=WALL + 1) is NonceStatus.VALID
    assert NonceFactory(b"z" * 32).check(nonce, wall=WALL + 1) is NonceStatus.INVALID


def test_distinct_salts_give_distinct_nonces() -> None:
    factory = NonceFactory(SECRET)
    nonces = {factory.make(wall=WALL, salt=i.to_bytes(8, "big")) for i in range(100)}
    assert len(nonces) == 100
    assert factory.make(wall=WALL, salt=b"s") == factory.make(wall=WALL + 0.5, salt=b"s")


def test_forged_and_mangled_nonces_are_invalid() -> None:
    factory = NonceFactory(SECRET)
    nonce = factory.make(wall=WALL, salt=b"12345678")
    flipped = nonce[:-1] + ("A" if nonce[-1] != "A" else "B")
    assert factory.check(flipped, wall=WALL) is NonceStatus.INVALID
    # change the timestamp without re-signing (try to make an old nonce young)
    import base64

    raw = bytearray(base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4)))
    raw[4] ^= 1
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert factory.check(forged, wall=WALL) is NonceStatus.INVALID
    for junk in (
        "",
        "x",
        "!!!!",
        "a" * 200,
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        "é" * 40,
        nonce + "=",
    ):
        assert factory.check(junk, wall=WALL) is NonceStatus.INVALID


def test_nonce_factory_arguments() -> None:
    with pytest.raises(ValueError):
        NonceFactory(b"short")
    with pytest.raises(ValueError):
        NonceFactory(SECRET, lifetime=0)
    with pytest.raises(ValueError):
        NonceFactory(SECRET).make(wall=WALL, salt=b"x" * 33)
    factory = NonceFactory(SECRET)
    assert factory.check(factory.make(wall=WALL, salt=b""), wall=WALL) is NonceStatus.VALID
    assert factory.check(factory.make(wall=WALL, salt=b"x" * 32), wall=WALL) is NonceStatus.VALID


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_nonce_check_never_raises(text: str) -> None:
    assert NonceFactory(SECRET).check(text, wall=WALL) in set(NonceStatus)


# -- single use -------------------------------------------------------------


def test_tracker_refuses_replay() -> None:
    tracker = NonceTracker(capacity=10, lifetime=300.0)
    assert tracker.use("a", wall=WALL)
    assert not tracker.use("a", wall=WALL + 1)
    assert not tracker.use("a", wall=WALL + 300)
    assert tracker.use("b", wall=WALL + 2)
    assert len(tracker) == 2


def test_tracker_forgets_only_what_the_factory_calls_stale() -> None:
    factory = NonceFactory(SECRET, lifetime=300.0)
    tracker = NonceTracker(capacity=10, lifetime=300.0)
    # worst case: a nonce stamped NONCE_SKEW seconds ahead of our clock
    nonce = factory.make(wall=WALL + NONCE_SKEW, salt=b"s")
    assert factory.check(nonce, wall=WALL) is NonceStatus.VALID
    assert tracker.use(nonce, wall=WALL)
    # walk the clock: whenever the factory still says VALID, the tracker refuses a replay
    t = WALL
    while factory.check(nonce, wall=t) is NonceStatus.VALID:
        assert not tracker.use(nonce, wall=t), t
        t += 1.0
    assert factory.check(nonce, wall=t) is NonceStatus.STALE
    tracker.expire(wall=t + 1)
    assert len(tracker) == 0


def test_tracker_full_of_fresh_entries_refuses_instead_of_evicting() -> None:
    tracker = NonceTracker(capacity=3, lifetime=300.0)
    for i, name in enumerate("abc"):
        assert tracker.use(name, wall=WALL + i)
    assert not tracker.use("d", wall=WALL + 5)  # full: an extra 401, never a replay
    assert tracker.refused_full == 1
    assert not tracker.use("a", wall=WALL + 6)  # the oldest is still remembered
    assert len(tracker) == 3
    # once the oldest expires, room frees up, oldest first
    later = WALL + 300 + NONCE_SKEW + 0.5
    assert tracker.use("d", wall=later)
    assert len(tracker) == 3
    assert not tracker.use("b", wall=later)


def test_tracker_clock_step_back_is_safe() -> None:
    tracker = NonceTracker(capacity=10, lifetime=300.0)
    assert tracker.use("a", wall=WALL)
    assert tracker.use("b", wall=WALL - 1000)  # the wall clock stepped back
    assert not tracker.use("a", wall=WALL - 999)
    assert not tracker.use("b", wall=WALL + 1)


def test_tracker_arguments() -> None:
    with pytest.raises(ValueError):
        NonceTracker(capacity=0)
    with pytest.raises(ValueError):
        NonceTracker(lifetime=-1)


# -- properties -------------------------------------------------------------

_printable = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=20
)


@settings(max_examples=150, deadline=None)
@given(username=_printable, realm=_printable, nonce=_printable, uri=_printable, cnonce=_printable)
def test_make_parse_round_trip(
    username: str, realm: str, nonce: str, uri: str, cnonce: str
) -> None:
    ha1 = compute_ha1(username, realm, "pw")
    challenge = parse_challenge(make_challenge(realm=realm, nonce=nonce))
    assert (challenge.realm, challenge.nonce) == (realm, nonce)
    creds = answer_challenge(
        challenge, username=username, ha1=ha1, method="INVITE", uri=uri, cnonce=cnonce
    )
    parsed = parse_authorization(make_authorization(creds))
    assert attrs_without_params(parsed) == attrs_without_params(creds)
    assert verify_response(parsed, ha1=ha1, method="INVITE", realm=realm)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_authorization_raises_only_parse_error(text: str) -> None:
    for value in (text, "Digest " + text):
        with contextlib.suppress(ParseError):
            parse_authorization(value)
        with contextlib.suppress(ParseError):
            parse_challenge(value)


def test_fold_inside_quoted_string_is_one_space() -> None:
    creds = parse_authorization(
        'Digest username="Mufasa", realm="two\r\n   words", nonce="n", uri="u", response="r"'
    )
    assert creds.realm == "two words"
    with pytest.raises(ParseError):  # a bare line end is not a fold
        parse_authorization('Digest username="a\r\nb", realm="r", nonce="n", uri="u", response="r"')


def test_quoted_pair_cannot_smuggle_control_characters() -> None:
    with pytest.raises(ParseError):
        parse_authorization(
            'Digest username="a\\\x00", realm="r", nonce="n", uri="u", response="r"'
        )
    creds = parse_authorization(
        'Digest username="a\\b", realm="r\\\\", nonce="n", uri="u", response="r"'
    )
    assert (creds.username, creds.realm) == ("ab", "r\\")


def test_single_quote_quirk_and_odd_values_round_trip() -> None:
    creds = parse_authorization(
        "Digest username='acme', realm='sip.kx21.com', nonce='n', uri='sip:x', "
        'response=\'r\', algorithm="x y", qop="auth", nc=00000001, cnonce=c'
    )
    assert creds.username == "acme" and creds.uri == "sip:x" and creds.algorithm == "x y"
    again = parse_authorization(make_authorization(creds))
    assert attrs_without_params(again) == attrs_without_params(creds)
    ha1 = compute_ha1("acme", "sip.kx21.com", "secret")
    assert not verify_response(creds, ha1=ha1, method="INVITE")  # unknown algorithm


def test_engine_flow_register_then_invite_single_use() -> None:
    """The guide §6 ladders with this module's pieces: a REGISTER may reuse
    its nonce with a growing nc; an INVITE's nonce is accepted once."""
    realm = "sip.kx21.com"
    factory = NonceFactory(SECRET)
    tracker = NonceTracker()
    ha1 = compute_ha1("acmeclient", realm, "pw")
    nonce = factory.make(wall=WALL, salt=b"salt0001")
    challenge = parse_challenge(make_challenge(realm=realm, nonce=nonce))
    for nc in (1, 2, 3):  # Linphone-style re-REGISTER with the same nonce
        creds = parse_authorization(
            make_authorization(
                answer_challenge(
                    challenge,
                    username="acmeclient",
                    ha1=ha1,
                    method="REGISTER",
                    uri=f"sip:{realm}",
                    cnonce="abc",
                    nc=nc,
                )
            )
        )
        assert factory.check(creds.nonce, wall=WALL + nc) is NonceStatus.VALID
        assert verify_response(creds, ha1=ha1, method="REGISTER", realm=realm)
    invite = answer_challenge(
        challenge,
        username="acmeclient",
        ha1=ha1,
        method="INVITE",
        uri=f"sip:17752180264@{realm}",
        cnonce="def",
    )
    assert verify_response(invite, ha1=ha1, method="INVITE", realm=realm)
    assert tracker.use(invite.nonce, wall=WALL + 5)
    assert not tracker.use(invite.nonce, wall=WALL + 6)  # the next INVITE needs a fresh nonce
    # a password change is seen at once: the old HA1 no longer verifies
    assert not verify_response(invite, ha1=compute_ha1("acmeclient", realm, "new"), method="INVITE")
