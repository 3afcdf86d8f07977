"""atheris harness: the SDP parser and the offer/answer policy (sansio_sip._sdp).

Invariant (STYLE §9): any bytes either parse or raise ``ParseError``; a
parsed description serialises to bytes that parse back to an equal model;
the policy (``filter_offer``, ``make_answer``, ``rewrite_media`` and the
read helpers) either succeeds or raises ``NoAcceptableCodec``. Anything
else escaping is a bug, and atheris reports it with the input.

Run (the seed corpus is written on first use from tests/vectors/sdp and the
softphone captures in ../shared/testdata, never copied into the repo):

    python3 fuzz/fuzz_sdp.py [CORPUS_DIR] -max_total_time=300

``tests/unit/test_fuzz_harnesses_digest_sdp.py`` runs ``check`` briefly
under hypothesis in normal CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# runnable from a plain checkout, like the other harnesses
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sansio_sip import ParseError
from sansio_sip._sdp import (
    NoAcceptableCodec,
    audio_formats,
    codec_name,
    filter_offer,
    make_answer,
    media_address,
    parse_sdp,
    rewrite_media,
    serialize_sdp,
)

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "vectors" / "sdp"
SOFTPHONES = REPO.parent / "shared" / "testdata" / "softphones"
DEFAULT_CORPUS = REPO / "fuzz" / "corpus-out" / "sdp"  # git-ignored


def check(data: bytes) -> None:
    """The invariant for one input; raises AssertionError (or the escaping
    exception) when it does not hold."""
    try:
        sd = parse_sdp(data)
    except ParseError:
        return
    wire = serialize_sdp(sd)
    again = parse_sdp(wire)
    assert again == sd, "parse(serialize(sd)) != sd"
    assert serialize_sdp(again) == wire, "serialisation is not stable"
    media_address(sd)
    codec_name(sd)
    audio_formats(sd)
    try:
        forwarded = filter_offer(sd)
    except NoAcceptableCodec:
        return
    assert len(forwarded.media) == 1
    relayed = rewrite_media(forwarded, address="203.0.113.5", port=20000, bump_version=True)
    assert parse_sdp(serialize_sdp(relayed)) == relayed
    answer = make_answer(sd, forwarded)
    assert len(answer.media) == len(sd.media), "RFC 3264 §6: one m= line per offered stream"
    rewrite_media(answer, address="2001:db8::1", port=20002)


def seeds() -> list[bytes]:
    """Every SDP of the vectors and the softphone INVITEs."""
    out: list[bytes] = []
    for path in sorted(VECTORS.glob("*.json")):
        case = json.loads(path.read_text())
        for key in ("offer", "other_answer"):
            if key in case:
                out.append(("\r\n".join(case[key]) + "\r\n").encode())
    for path in sorted(SOFTPHONES.glob("*.sip")):
        _head, sep, body = path.read_bytes().partition(b"\r\n\r\n")
        if sep and body.startswith(b"v=0"):
            out.append(body)
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
