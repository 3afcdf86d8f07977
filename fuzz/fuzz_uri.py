#!/usr/bin/env python3
"""atheris harness: URI, Via, name-addr, Contact, CSeq and parameter parsers.

Invariant: each parser answers or raises ``ParseError``; what parses
serialises (``str``) to text that parses back to an equal value (a name-addr
may gain ``<>`` when its URI needs them). Input bytes that are not UTF-8 are
decoded with surrogateescape, so odd code points are exercised too.

    python3 fuzz/fuzz_uri.py [-max_total_time=20] [fuzz/corpus-out/seeds/uri]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from sansio_sip import (
    NameAddr,
    ParseError,
    parse_contact,
    parse_cseq,
    parse_name_addr,
    parse_params,
    parse_uri,
    parse_via,
    split_header_values,
    unescape,
)


def one_input(data: bytes) -> None:
    """The invariant for one input."""
    text = data.decode("utf-8", "surrogateescape")
    try:
        uri = parse_uri(text)
    except ParseError:
        pass
    else:
        assert parse_uri(str(uri)) == uri, (text, uri)
    try:
        via = parse_via(text)
    except ParseError:
        pass
    else:
        assert parse_via(str(via)) == via, (text, via)
        via.branch, via.rport, via.ttl, via.sent_by  # noqa: B018
    try:
        na = parse_name_addr(text)
    except ParseError:
        pass
    else:
        again = parse_name_addr(str(na))
        assert (again.display_name, again.uri, again.params) == (
            na.display_name,
            na.uri,
            na.params,
        ), (text, na, again)
        with contextlib.suppress(ParseError):
            na.parsed_uri  # noqa: B018
    for item in split_header_values(text):
        try:
            contact = parse_contact(item)
        except ParseError:
            continue
        assert contact == "*" or isinstance(contact, NameAddr)
    with contextlib.suppress(ParseError):
        parse_cseq(text)
    with contextlib.suppress(ParseError):
        parse_params(text)
    unescape(text)


def main() -> None:
    import atheris

    if not any(arg for arg in sys.argv[1:] if not arg.startswith("-")):
        from make_seeds import write

        sys.argv.append(str(write("uri")))
    atheris.instrument_all()  # coverage feedback for sansio_sip (already imported)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
