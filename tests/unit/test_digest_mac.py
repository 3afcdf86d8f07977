"""NonceFactory computes HMAC-SHA256 from precomputed keyed states; it must
be exactly RFC 2104's HMAC for every secret length (shorter than, equal to
and longer than SHA-256's 64-byte block, which is hashed first)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from sansio_sip._digest import NonceFactory, NonceStatus


@pytest.mark.parametrize("length", [16, 32, 63, 64, 65, 200])
def test_mac_is_rfc2104_hmac_sha256(length: int) -> None:
    secret = bytes(range(length % 256)) * (length // 256) + bytes(range(length % 256))
    secret = (secret or b"x")[:length].ljust(length, b"s")
    factory = NonceFactory(secret)
    for payload in (b"", b"\x00" * 13, b"stamp+salt", bytes(range(256))):
        expected = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
        assert factory._mac(payload) == expected
        assert factory._mac(payload) == expected  # the keyed states are not consumed


def test_nonce_made_by_one_factory_checks_in_another_with_the_secret() -> None:
    nonce = NonceFactory(b"k" * 100).make(wall=1000.0, salt=b"12345678")
    assert NonceFactory(b"k" * 100).check(nonce, wall=1001.0) is NonceStatus.VALID
    assert NonceFactory(b"j" * 100).check(nonce, wall=1001.0) is NonceStatus.INVALID
