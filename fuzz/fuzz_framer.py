#!/usr/bin/env python3
"""atheris harness: StreamFramer under any chunking.

Invariant: feeding a byte stream whole or in chunks (cut where the input's
first bytes say) gives the same messages and keep-alive count, or both
raise ``ParseError``; every message framed parses or raises ``ParseError``.

    python3 fuzz/fuzz_framer.py [-max_total_time=20] [fuzz/corpus-out/seeds/framer]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from sansio_sip import ParseError, StreamFramer, parse_message

_LIMITS = {"max_header_bytes": 2048, "max_body_bytes": 4096}


def _run(chunks: list[bytes]) -> tuple[list[bytes], int] | None:
    framer = StreamFramer(**_LIMITS)
    out: list[bytes] = []
    try:
        for chunk in chunks:
            out += framer.feed(chunk)
    except ParseError:
        return None
    assert framer.buffered <= _LIMITS["max_header_bytes"] + _LIMITS["max_body_bytes"] + 4 + max(
        (len(c) for c in chunks), default=0
    )
    return out, framer.keepalives


def one_input(data: bytes) -> None:
    """The invariant for one input."""
    if not data:
        return
    step = data[0] % 17 + 1  # the first byte picks the chunk size
    stream = data[1:]
    whole = _run([stream])
    chunked = _run([stream[i : i + step] for i in range(0, len(stream), step)])
    assert (whole is None) == (chunked is None), (whole, chunked)
    if whole is None or chunked is None:
        return
    assert whole == chunked, (whole, chunked)
    for message in whole[0]:
        with contextlib.suppress(ParseError):
            parse_message(message)


def main() -> None:
    import atheris

    if not any(arg for arg in sys.argv[1:] if not arg.startswith("-")):
        from make_seeds import write

        # Prefix each stream with a chunk-size byte so seeds exercise cutting.
        directory = write("framer")
        for path in directory.iterdir():
            data = path.read_bytes()
            if data[:1] != b"\x05":
                path.write_bytes(b"\x05" + data)
        sys.argv.append(str(directory))
    atheris.instrument_all()  # coverage feedback for sansio_sip (already imported)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
