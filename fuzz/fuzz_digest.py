"""atheris harness: the Digest header parsers and nonce checks (sansio_sip._digest).

Invariant (STYLE §9): any header value either parses or raises
``ParseError``; parsed credentials written back with ``make_authorization``
parse to the same fields; ``verify_response`` answers True or False, never
raises; ``NonceFactory.check`` returns a ``NonceStatus`` for any string.
Header values reach this module already decoded by the message layer
(strict UTF-8), so input bytes that are not UTF-8 are decoded with
surrogateescape to exercise odd code points too.

Run (seeds are written on first use from tests/vectors/digest and the
softphone captures in ../shared/testdata, never copied into the repo):

    python3 fuzz/fuzz_digest.py [CORPUS_DIR] -max_total_time=300
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# runnable from a plain checkout, like the other harnesses
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sansio_sip import ParseError
from sansio_sip._digest import (
    DigestCredentials,
    NonceFactory,
    NonceStatus,
    compute_ha1,
    make_authorization,
    parse_authorization,
    parse_challenge,
    verify_response,
)

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "vectors" / "digest"
SOFTPHONES = REPO.parent / "shared" / "testdata" / "softphones"
DEFAULT_CORPUS = REPO / "fuzz" / "corpus-out" / "digest"  # git-ignored

_FACTORY = NonceFactory(b"fuzzing-secret-0123456789abcdef")
_HA1 = compute_ha1("acme", "sip.kx21.com", "secret")


def _fields(creds: DigestCredentials) -> tuple[object, ...]:
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


def check(data: bytes) -> None:
    """The invariant for one input."""
    text = data.decode("utf-8", "surrogateescape")
    assert _FACTORY.check(text, wall=1_750_000_000.0) in NonceStatus
    try:
        creds = parse_authorization(text)
    except ParseError:
        pass
    else:
        assert isinstance(verify_response(creds, ha1=_HA1, method="INVITE"), bool)
        assert isinstance(
            verify_response(creds, ha1=_HA1, method="INVITE", realm="sip.kx21.com"), bool
        )
        written = make_authorization(creds)
        assert _fields(parse_authorization(written)) == _fields(creds), written
    try:
        challenge = parse_challenge(text)
    except ParseError:
        return
    assert isinstance(challenge.qop_options, tuple)


def seeds() -> list[bytes]:
    """Authorization and challenge values of the vectors, and every auth
    header line of the softphone captures."""
    out: list[bytes] = []
    for path in sorted(VECTORS.glob("*.json")):
        case = json.loads(path.read_text())
        out.append(case["authorization"].encode())
        out.append(case["challenge"].encode())
    for path in sorted(SOFTPHONES.glob("*.sip")):
        for line in path.read_bytes().split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() in (b"authorization", b"proxy-authorization"):
                out.append(value.strip())
    out.append(_FACTORY.make(wall=1_750_000_000.0, salt=b"12345678").encode())
    return out


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds()):
        target = directory / f"seed-{index:03d}"
        if not target.exists():
            target.write_bytes(seed)


def fuzz_one_input(data: bytes) -> None:
    check(data)


def main(argv: list[str]) -> None:
    import atheris  # only the fuzzing run needs it

    if not any(not arg.startswith("-") for arg in argv[1:]):
        write_seeds(DEFAULT_CORPUS)
        argv = [*argv, str(DEFAULT_CORPUS)]
    # the parsers were imported above, uninstrumented: instrument them now
    # so libFuzzer gets coverage feedback from sansio_sip
    atheris.instrument_all()
    atheris.Setup(argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
