"""ServerSettings and the address parsers behind serve's options."""

from __future__ import annotations

import attrs
import pytest

from kx_sipd.settings import (
    ServerSettings,
    field_doc,
    format_address,
    parse_address,
    parse_port_range,
)


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("0.0.0.0:5060", None, ("0.0.0.0", 5060)),
        ("[::1]:5070", None, ("::1", 5070)),
        ("[2001:db8::1]", 5060, ("2001:db8::1", 5060)),
        ("2001:db8::1", 5060, ("2001:db8::1", 5060)),
        ("sip.example.com", 5080, ("sip.example.com", 5080)),
        (" 127.0.0.1:1 ", None, ("127.0.0.1", 1)),
    ],
)
def test_parse_address(text: str, default_port: int | None, expected: tuple[str, int]) -> None:
    assert parse_address(text, default_port=default_port) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("127.0.0.1", "missing ':PORT'"),
        ("127.0.0.1:", "is not a number"),
        ("127.0.0.1:0", "outside 1-65535"),
        ("127.0.0.1:65536", "outside 1-65535"),
        ("[::1", "missing ']'"),
        ("[::1]5060", "expected ':PORT'"),
        ("[nothost]:5060", "not an IPv6 address"),
        ("1:2:3", "not an IPv6 address"),
        (":5060", "missing host"),
    ],
)
def test_parse_address_names_the_fault(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(text)


def test_format_address_brackets_ipv6() -> None:
    assert format_address(("::1", 5060)) == "[::1]:5060"
    assert format_address(("192.0.2.1", 5060)) == "192.0.2.1:5060"
    assert parse_address(format_address(("2001:db8::5", 7))) == ("2001:db8::5", 7)


def test_parse_port_range() -> None:
    assert parse_port_range("20000-20999") == (20000, 20999)
    for bad in ("20000", "a-b", "30000-20000", "0-10"):
        with pytest.raises(ValueError):
            parse_port_range(bad)


@pytest.mark.parametrize(
    ("listen", "sip_address", "expected"),
    [
        ((("0.0.0.0", 5060),), None, ("127.0.0.1", 5060)),
        ((("::", 5070),), None, ("::1", 5070)),
        ((("192.0.2.4", 5080), ("::1", 5060)), None, ("192.0.2.4", 5080)),
        ((("0.0.0.0", 5060),), ("sip.example.com", 5060), ("sip.example.com", 5060)),
    ],
)
def test_the_advertised_address_is_never_a_wildcard(
    listen: tuple[tuple[str, int], ...],
    sip_address: tuple[str, int] | None,
    expected: tuple[str, int],
) -> None:
    settings = ServerSettings(listen=listen, sip_address=sip_address)
    assert settings.advertised_sip_address == expected
    assert settings.advertised_rtp_address == expected[0]
    assert ServerSettings(listen=listen, rtp_address="198.51.100.1").advertised_rtp_address == (
        "198.51.100.1"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"listen": ()}, "at least one listen address"),
        ({"backend": "curio"}, "backend must be one of"),
        ({"driver": "twisted"}, "driver must be one of"),
        ({"log_level": "loud"}, "log-level must be one of"),
        ({"rtp_range": (20000, 20001)}, "at least two"),
        ({"echo_number": "*97"}, "digits"),
        ({"relay": ("10.0.0.1", 22220)}, "needs --relay-secret"),
        ({"media_timeout": 0}, "media-timeout must be positive"),
        ({"max_calls": -1}, "max-calls must be positive"),
    ],
)
def test_settings_refuse_nonsense(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings(**changes)  # type: ignore[arg-type]


def test_settings_are_frozen_and_the_secret_is_not_in_repr() -> None:
    settings = ServerSettings(relay=("10.0.0.1", 22220), relay_secret="0123456789abcdef")
    assert "0123456789abcdef" not in repr(settings)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.db = "other"  # type: ignore[misc]


def test_every_field_has_a_doc() -> None:
    for field in attrs.fields(ServerSettings):
        assert len(field_doc(field.name)) > 10
