#!/usr/bin/env python3
"""Seed corpora for the message-layer fuzz harnesses, built from the vectors.

The vectors stay in ../shared/testdata (never copied into the repository);
this script derives seeds from them: whole messages (fuzz_message), the same
messages joined into streams with keep-alives (fuzz_framer), and every URI,
Via and name-addr value found in them (fuzz_uri). ``seed_inputs(kind)``
returns them in memory (the unit test uses that); run as a script to write
them as files under fuzz/corpus-out/seeds/<kind>/ (git-ignored) for atheris:

    python3 fuzz/make_seeds.py   # writes fuzz/corpus-out/seeds/{message,framer,uri}/
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
SEEDS = REPO / "fuzz" / "corpus-out" / "seeds"  # git-ignored: derived, never committed
KINDS = ("message", "framer", "uri")

_URI_IN_ANGLES = re.compile(rb"<([^<>\r\n]+)>")


def _messages() -> list[bytes]:
    files = sorted((TESTDATA / "rfc4475").glob("*.dat"))
    files += sorted((TESTDATA / "softphones").glob("*.sip"))
    files += sorted((REPO.parent / "shared" / "anchors" / "corpus").glob("*.sip"))
    return [p.read_bytes() for p in files]


def seed_inputs(kind: str) -> list[bytes]:
    """The seeds of one harness, derived from the shared vectors."""
    messages = _messages()
    if kind == "message":
        return messages
    if kind == "framer":
        streams = [b"\r\n\r\n".join(messages[i : i + 3]) for i in range(0, len(messages), 3)]
        return [*streams, b"\r\n\r\n\r\n", b"\r\n" + messages[0]]
    if kind == "uri":
        out: set[bytes] = set()
        for data in messages:
            head = data.split(b"\r\n\r\n", 1)[0]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) == 3 and not lines[0].startswith(b"SIP/"):
                out.add(parts[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() in (b"via", b"v", b"from", b"f", b"to", b"t",
                                            b"contact", b"m", b"route", b"record-route"):  # fmt: skip
                    out.add(value.strip())
                out.update(_URI_IN_ANGLES.findall(line))
        return sorted(out)
    raise ValueError(f"unknown seed kind {kind!r}; one of {KINDS}")


def write(kind: str, directory: Path | None = None) -> Path:
    """Write one corpus as files named by content hash; return the directory."""
    target = directory or SEEDS / kind
    target.mkdir(parents=True, exist_ok=True)
    for seed in seed_inputs(kind):
        (target / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return target


def main() -> None:
    for kind in sys.argv[1:] or KINDS:
        print(write(kind))


if __name__ == "__main__":
    main()
