#!/usr/bin/env python3
"""The REGISTER path inside the engine: cost per registration and where it goes.

One registration is what a softphone does: REGISTER -> 401 (challenge) ->
REGISTER with Authorization -> account look-up -> 200, two server
transactions. This script measures only the server side, in process, with no
sockets: it first *records* N registrations against one engine (the client's
digest computed between the two requests), then *replays* the recorded
datagrams into a fresh engine built with the same seed and fed the same clock.
The engine is deterministic (sans-IO, injected entropy), so the replay
issues the same nonces and answers 200 each time; the replay loop runs server
code only. That makes two figures comparable across runs and machines:

* instructions per registration, under ``--callgrind`` (the script re-runs
  itself under ``valgrind --tool=callgrind`` with N and with 0 replays and
  prints the difference over N: stable however loaded the machine is);
* the split of the replay's own time by layer (cProfile, ``--profile``):
  message parsing, response building and serialisation, the transaction
  layer, digest and nonces, the engine's own logic, the rest.

The datagrams are a Linphone-style REGISTER (the anchor corpus's
01_register_auth.sip, without its Authorization), a fresh Call-ID per
registration, CSeq 1 then 2, as SIPp's reg_auth.xml does.

The replay runs with the collector settled as ``kx-sipd serve`` settles it
once up (``kx_sipd.app.settle_gc``: start-up frozen, thresholds raised);
``--default-gc`` keeps CPython's defaults instead.

  python3 bench/register_inprocess.py [--n 2000] [--profile] [--callgrind] [--default-gc]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from _measure import instructions, print_profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sansio_sip import (  # noqa: E402
    Account,
    Engine,
    EngineConfig,
    LookupAccount,
    Route,
    Send,
    Transport,
    parse_message,
)
from sansio_sip._digest import (  # noqa: E402
    answer_challenge,
    compute_ha1,
    make_authorization,
    parse_challenge,
)

REALM = "sip.example.com"
SERVER = ("192.0.2.1", 5060)
CLIENT = ("192.0.2.10", 5060)
USER, PASSWORD = "1001", "secret1001"

REGISTER = (
    "REGISTER sip:{realm} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK.{branch};rport\r\n"
    "From: <sip:{user}@{realm}>;tag={tag}\r\n"
    "To: sip:{user}@{realm}\r\n"
    "CSeq: {cseq} REGISTER\r\n"
    "Call-ID: {call_id}\r\n"
    "Max-Forwards: 70\r\n"
    "Supported: replaces, outbound, gruu, path\r\n"
    "Accept: application/sdp\r\n"
    "Accept: text/plain\r\n"
    "Accept: application/vnd.gsma.rcs-ft-http+xml\r\n"
    "Contact: <sip:{user}@192.0.2.10;transport=udp>;+sip.instance="
    '"<urn:uuid:e8a2c4f0-5a1b-4b7e-9d3c-2f6e8a0b1c2d>";+org.linphone.specs="lime"\r\n'
    "Expires: 3600\r\n"
    "User-Agent: Linphone-Desktop/5.2.6 (debian) LinphoneSDK/5.3.0\r\n"
    "{authorization}"
    "Content-Length: 0\r\n"
    "\r\n"
)

# Layers: by module, and inside _message.py by function. Built-in functions
# (hashing, str methods, regex calls) and attrs-generated methods are charged
# to the layer of the function that called them.
MESSAGE_PARSE = {
    "parse_message",
    "_fix_fields",
    "_parse_request_line",
    "_parse_status_line",
    "_parse_contacts",
    "_is_call_id",
    "_key",
    "_cache_via_from_to",
}
MESSAGE_BUILD = {
    "make_response",
    "_serialise",
    "__bytes__",
    "_start_line",
    "add",
    "insert",
    "set",
    "remove",
    "_check_field",
    "__init__",
    "_changed",
    "_trusted",
}
FILE_LAYERS = {
    "_headers.py": "header/URI parse", "_uri.py": "header/URI parse",
    "_wire.py": "response build + serialise",
    "_transaction.py": "transaction layer", "_timers.py": "transaction layer",
    "_digest.py": "digest + nonces", "_auth.py": "digest + nonces",
    "_engine.py": "engine + TU + guard", "_tu.py": "engine + TU + guard",
    "_guard.py": "engine + TU + guard", "_devices.py": "engine + TU + guard",
    "_dialog.py": "engine + TU + guard", "_actions.py": "engine + TU + guard",
    "register_inprocess.py": "this script (feeding)",
}  # fmt: skip


def layer_of(func: tuple[str, int, str]) -> str | None:
    """The layer of a profiled function, None for built-ins and generated code."""
    path, _, name = func
    base = os.path.basename(path)
    if base == "_message.py":
        if name in MESSAGE_PARSE:
            return "message parse"
        if name in MESSAGE_BUILD:
            return "response build + serialise"
        return "message accessors/headers"
    return FILE_LAYERS.get(base)


def make_engine(seed: int) -> Engine:
    rng = random.Random(seed)
    config = EngineConfig(nonce_secret=b"k" * 32, sip_address=SERVER, realm=REALM)
    return Engine(config, entropy=rng.randbytes)


def account() -> Account:
    return Account(
        username=USER,
        ha1={"MD5": compute_ha1(USER, REALM, PASSWORD)},
        route=Route(name="carrier", host="192.0.2.50", port=5060),
    )


Step = tuple[bytes, float]


def answered(engine: Engine, data: bytes, now: float, acct: Account) -> list[bytes]:
    """Feed one datagram; perform the look-ups; return what the engine sent."""
    out: list[bytes] = []
    actions = engine.receive(data, source=CLIENT, transport=Transport.UDP, now=now, wall=now)
    while actions:
        action = actions.pop(0)
        if isinstance(action, Send):
            out.append(action.data)
        elif isinstance(action, LookupAccount):
            actions += engine.account_found(action.token, acct, now=now, wall=now)
    return out


def record(n: int, seed: int) -> list[Step]:
    """N registrations against one engine; the datagrams and clock it saw."""
    engine, acct = make_engine(seed), account()
    steps: list[Step] = []
    now = 1000.0
    for i in range(n):
        fields = dict(realm=REALM, user=USER, tag=f"t{i:06d}x", call_id=f"reg{i:07d}@192.0.2.10")
        first = REGISTER.format(branch=f"a{i:07d}", cseq=1, authorization="", **fields).encode()
        [challenge_bytes] = answered(engine, first, now, acct)
        challenge = parse_message(challenge_bytes)
        header = challenge.headers.get("WWW-Authenticate") or ""
        credentials = answer_challenge(
            parse_challenge(header),
            username=USER,
            ha1=compute_ha1(USER, REALM, PASSWORD),
            method="REGISTER",
            uri=f"sip:{REALM}",
            cnonce=f"{i:08x}",
            nc=1,
        )
        authorization = f"Authorization: {make_authorization(credentials)}\r\n"
        second = REGISTER.format(branch=f"b{i:07d}", cseq=2, authorization=authorization, **fields)
        steps += [(first, now), (second.encode(), now + 0.001)]
        now += 0.01
    return steps


def replay(steps: list[Step], seed: int) -> tuple[Engine, list[bytes]]:
    engine, acct = make_engine(seed), account()
    finals: list[bytes] = []
    for data, now in steps:
        finals += answered(engine, data, now, acct)
    return engine, finals


def check(finals: list[bytes], n: int) -> None:
    codes = [f.split(b" ", 2)[1] for f in finals]
    if codes != [b"401", b"200"] * n:
        sys.exit(f"replay did not answer 401, 200 each time: {codes[:6]} ...")


def callgrind(n: int, seed: int, default_gc: bool) -> None:
    """Instructions per registration: (replay of n) - (replay of 0), over n."""
    gc = ("--default-gc",) if default_gc else ()
    args = ("--n", str(n), "--seed", str(seed), *gc, "--replays")
    counts = [instructions(__file__, *args, str(k)) for k in (0, n)]
    print(
        f"callgrind: {(counts[1] - counts[0]) / n:,.0f} instructions per registration "
        f"(n={n}, {'default' if default_gc else 'server'} GC)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="registrations")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="split the replay's time by layer")
    ap.add_argument("--callgrind", action="store_true", help="instructions per registration")
    ap.add_argument("--default-gc", action="store_true", help="CPython's collector settings")
    ap.add_argument("--replays", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = record(args.n, args.seed)
    if not args.default_gc:
        from kx_sipd.app import settle_gc

        settle_gc()
    if args.replays is not None:  # the run callgrind counts: record, then replay k
        if args.replays:
            replay(steps, args.seed)
        return
    if args.callgrind:
        callgrind(args.n, args.seed, args.default_gc)
        return
    t0 = time.process_time()
    _, finals = replay(steps, args.seed)
    cpu = time.process_time() - t0
    check(finals, args.n)
    print(
        f"python {sys.version.split()[0]}  n={args.n}  gc={'default' if args.default_gc else 'server'}"
        f"  {cpu / args.n * 1e6:,.1f} us CPU per "
        f"registration (2 transactions, 4 messages), {args.n / cpu:,.0f} registrations/s"
    )
    if args.profile:
        print_profile(lambda: replay(steps, args.seed), cpu, layer_of, top=12)


if __name__ == "__main__":
    main()
