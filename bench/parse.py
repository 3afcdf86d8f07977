#!/usr/bin/env python3
"""SIP parse throughput: kx-sipd's parser against other pure-Python parsers.

Parses every message of the anchor corpus (``../shared/anchors/corpus/*.sip``
relative to the repository, i.e. REGISTER with Authorization, INVITE with SDP,
200 OK with SDP, 401, BYE) and, for each, reads what a proxy or B2BUA reads on
every message: method or status, top Via branch and sent-by, From tag, To tag,
Call-ID, CSeq number and method. Lazy parsers are forced to parse those.

Parsers, all measured in the same run and interleaved per repeat so machine
noise hits them alike:
  kx-sipd      sansio_sip.parse_message (full RFC 4475 validation included)
  naive-split  a dict-of-lines splitter that validates nothing: a rough
               ceiling for pure-Python parsing
  sippy        sippy.SipRequest / sippy.SipResponse (PyPI ``sippy``)
  sipmessage   sipmessage.Message (PyPI ``sipmessage``)
The last two are the ``bench`` extra (``pip install sipmessage sippy``); when
one is missing the run says so and goes on.

Prints one line per parser (median msgs/s over the repeats, min, max, ratio to
naive-split) and the ratio of kx-sipd to the fastest third-party parser.
Issue 2's target: >= 100,000 msgs/s on one core and >= 3x the fastest of them.

On a shared, loaded machine wall-clock rates wander; ``--callgrind`` counts
instructions instead (valgrind's callgrind, each parser in its own process,
a run of ``--n`` passes minus a run of none, over the messages parsed): the
same on every run, and the ratios compare parsers the way the rates would on
a quiet core.

  python3 bench/parse.py [--n 1000] [--repeats 5] [--corpus DIR] [--callgrind]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _measure import instructions

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sansio_sip import Request, parse_message  # noqa: E402

Fields = tuple[object, ...]
DEFAULT_CORPUS = REPO.parent / "shared" / "anchors" / "corpus"


def load_corpus(directory: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(directory.glob("*.sip"))]


def kx_sipd(data: bytes) -> Fields:
    m = parse_message(data)
    via = m.top_via
    cseq = m.cseq
    first = m.method if isinstance(m, Request) else m.status_code
    return (
        first,
        via.branch,
        via.sent_by,
        m.from_.tag,
        m.to.tag,
        m.call_id,
        cseq.number,
        cseq.method,
    )


_BRANCH = re.compile(r";\s*branch=([^;,\s]+)")
_TAG = re.compile(r";\s*tag=([^;>\s]+)")
_SENT_BY = re.compile(r"SIP\s*/\s*2\.0\s*/\s*\S+\s+([^;,\s]+)")


def naive_split(data: bytes) -> Fields:
    head, _, _body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8").split("\r\n")
    h: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k not in h:
            h[k] = v.strip()
    words = lines[0].split(" ", 2)
    first: object = int(words[1]) if words[0].startswith("SIP/") else words[0]
    via = h.get("via") or h["v"]
    branch = _BRANCH.search(via)
    sent_by = _SENT_BY.match(via)
    ftag = _TAG.search(h.get("from") or h["f"])
    ttag = _TAG.search(h.get("to") or h["t"])
    num, meth = h["cseq"].split()
    return (
        first,
        branch.group(1) if branch else None,
        sent_by.group(1) if sent_by else None,
        ftag.group(1) if ftag else None,
        ttag.group(1) if ttag else None,
        h.get("call-id") or h["i"],
        int(num),
        meth,
    )


def make_sippy() -> Callable[[bytes], Fields]:
    from sippy.SipRequest import SipRequest
    from sippy.SipResponse import SipResponse

    def parse(data: bytes) -> Fields:
        text = data.decode("utf-8")
        msg = SipResponse(buf=text) if text.startswith("SIP/2.0 ") else SipRequest(buf=text)
        via = msg.getHFBody("via")
        cseq = msg.getHFBody("cseq")
        first = msg.getSCode()[0] if isinstance(msg, SipResponse) else msg.getMethod()
        to_tag = msg.getHFBody("to").getTag()
        return (
            first,
            via.getBranch(),
            via.getTAddr()[0] + (f":{via.getTAddr()[1]}" if via.getTAddr()[1] else ""),
            msg.getHFBody("from").getTag(),
            to_tag,
            str(msg.getHFBody("call-id")),
            cseq.getCSeqNum(),
            cseq.getCSeqMethod(),
        )

    return parse


def make_sipmessage() -> Callable[[bytes], Fields]:
    from sipmessage import Message

    def parse(data: bytes) -> Fields:
        m = Message.parse(data)
        via = m.via[0]
        cs = m.cseq
        first = getattr(m, "method", None) or getattr(m, "code", None)
        return (
            first,
            via.parameters["branch"],
            getattr(via, "address", None),
            m.from_address.parameters.get("tag"),
            m.to_address.parameters.get("tag"),
            m.call_id,
            cs.sequence,
            cs.method,
        )

    return parse


def rate(fn: Callable[[bytes], Fields], datas: list[bytes], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        for d in datas:
            fn(d)
    return n * len(datas) / (time.perf_counter() - t0)


CANDIDATES: list[tuple[str, Callable[[], Callable[[bytes], Fields]]]] = [
    ("kx-sipd", lambda: kx_sipd),
    ("naive-split", lambda: naive_split),
    ("sippy", make_sippy),
    ("sipmessage", make_sipmessage),
]


def passes_only(name: str, datas: list[bytes], n: int) -> None:
    """What callgrind counts: build one parser, parse the corpus once (imports,
    caches warm), then n more passes."""
    fn = dict(CANDIDATES)[name]()
    for d in datas:
        fn(d)
    for _ in range(n):
        for d in datas:
            fn(d)


def callgrind(corpus: Path, n: int) -> None:
    """Instructions per message for each installed parser, and the ratios."""
    datas = [data for _, data in load_corpus(corpus)]
    per_message: dict[str, float] = {}
    for name, make in CANDIDATES:
        try:
            make()
        except ImportError as exc:
            print(f"{name:<12} skipped: not installed ({exc.name})")
            continue
        run = ("--corpus", str(corpus), "--passes-only", name, "--n")
        counts = [instructions(__file__, *run, str(passes)) for passes in (0, n)]
        per_message[name] = (counts[1] - counts[0]) / (n * len(datas))
    print(f"python {sys.version.split()[0]}  corpus={len(datas)} msgs  n={n}  (callgrind)")
    print(f"{'parser':<12} {'instr/msg':>10} {'speed vs naive':>15}")
    base = per_message["naive-split"]
    for name, count in per_message.items():
        print(f"{name:<12} {count:>10,.0f} {base / count:>15.3f}")
    others = {k: v for k, v in per_message.items() if k not in ("kx-sipd", "naive-split")}
    if others:
        best = min(others, key=lambda k: others[k])
        print(
            f"kx-sipd speed / fastest other ({best}), by instructions: "
            f"{others[best] / per_message['kx-sipd']:.2f}x  (target >= 3x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="passes over the corpus per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument(
        "--callgrind", action="store_true", help="count instructions per message (n=100 is plenty)"
    )
    ap.add_argument("--passes-only", metavar="PARSER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    msgs = load_corpus(args.corpus)
    if not msgs:
        sys.exit(f"no *.sip files in {args.corpus}")
    if args.passes_only:
        passes_only(args.passes_only, [data for _, data in msgs], args.n)
        return
    if args.callgrind:
        callgrind(args.corpus, args.n)
        return

    candidates = CANDIDATES
    parsers: dict[str, tuple[Callable[[bytes], Fields], list[bytes]]] = {}
    notes: dict[str, str] = {}
    reference = {name: kx_sipd(data) for name, data in msgs}
    for name, make in candidates:
        try:
            fn = make()
        except ImportError as exc:
            notes[name] = f"not installed ({exc.name}); pip install sipmessage sippy"
            continue
        usable, disagree = [], []
        for mname, data in msgs:
            try:
                got = fn(data)
            except Exception as exc:  # a third-party parser failing is a note, not a crash
                disagree.append(f"{mname}: {type(exc).__name__}")
                continue
            usable.append(data)
            # Compare the fields every parser reports the same way (tags, Call-ID, CSeq).
            if [str(x) for x in got[3:]] != [str(x) for x in reference[mname][3:]]:
                disagree.append(f"{mname}: reads {got[3:]}")
        if disagree:
            notes[name] = "; ".join(disagree)
        if usable:
            parsers[name] = (fn, usable)

    rates: dict[str, list[float]] = {name: [] for name in parsers}
    for _ in range(args.repeats):
        for name, (fn, datas) in parsers.items():
            rates[name].append(rate(fn, datas, args.n))

    base = statistics.median(rates["naive-split"])
    print(
        f"python {sys.version.split()[0]}  corpus={len(msgs)} msgs  n={args.n}  "
        f"repeats={args.repeats}"
    )
    print(f"{'parser':<12} {'msgs/s':>10} {'min':>10} {'max':>10} {'vs naive':>9}  notes")
    for name, runs in rates.items():
        med = statistics.median(runs)
        print(
            f"{name:<12} {med:>10,.0f} {min(runs):>10,.0f} {max(runs):>10,.0f} "
            f"{med / base:>9.3f}  {notes.get(name, '')[:160]}"
        )
    for name, note in notes.items():
        if name not in rates:
            print(f"{name:<12} skipped: {note}")
    ours = statistics.median(rates["kx-sipd"])
    others = {
        n: statistics.median(r) for n, r in rates.items() if n not in ("kx-sipd", "naive-split")
    }
    if others:
        best = max(others, key=lambda n: others[n])
        print(
            f"kx-sipd / fastest other ({best}): {ours / others[best]:.2f}x  "
            f"(target >= 3x); kx-sipd {ours:,.0f} msgs/s (target >= 100,000)"
        )
    else:
        print(f"kx-sipd {ours:,.0f} msgs/s (target >= 100,000); no other parser installed")


if __name__ == "__main__":
    main()
