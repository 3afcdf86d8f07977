#!/usr/bin/env python3
"""atheris harness: parse_message and every structured accessor.

Invariant (STYLE §9): any datagram either parses or raises ``ParseError``;
nothing else escapes. What parses can be read through every accessor (each
answers or raises ``ParseError``), serialises to bytes that parse back to an
equal message, and a request whose To parses can be answered with
``make_response`` (one with a malformed To, found on first access, is answered
statelessly by the engine instead).

    python3 fuzz/fuzz_message.py [-max_total_time=20] [fuzz/corpus-out/seeds/message]

The seed directory is written from ../shared/testdata on first use
(fuzz/make_seeds.py).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sansio_sip import NameAddr, ParseError, Request, make_response, parse_message

_ACCESSORS = (
    "vias", "top_via", "from_", "to", "call_id", "cseq", "contacts", "routes",
    "record_routes", "max_forwards", "expires", "content_type",
)  # fmt: skip


def one_input(data: bytes) -> None:
    """The invariant for one input; raises AssertionError or an unexpected
    exception when it does not hold."""
    try:
        message = parse_message(data)
    except ParseError:
        return
    for name in _ACCESSORS:
        try:
            value = getattr(message, name)
        except ParseError:
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, NameAddr):
                with contextlib.suppress(ParseError):
                    item.parsed_uri  # noqa: B018
                str(item)
    wire = bytes(message)
    again = parse_message(wire, max_size=2 * len(wire) + 1024)
    assert again == message, (message, again)
    if isinstance(message, Request):
        try:
            message.to  # noqa: B018
        except ParseError:
            return
        response = make_response(message, 200, "OK", to_tag="fuzz")
        assert parse_message(bytes(response)) == response


def main() -> None:
    import atheris

    here = Path(__file__).resolve().parent
    if not any(arg for arg in sys.argv[1:] if not arg.startswith("-")):
        from make_seeds import write

        sys.argv.append(str(write("message")))
    sys.path.insert(0, str(here))
    atheris.instrument_all()  # coverage feedback for sansio_sip (already imported)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
