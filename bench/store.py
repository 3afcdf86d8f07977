"""Cost of the store's hot path and of a durable call-record write.

Prints per-operation times measured in this run and ratios against a
reference measured in the same run (one plain SQLite primary-key SELECT on the
same file), so figures from different machines compare:

* get_account, cache hit: the PRAGMA data_version check plus a dict look-up;
* get_account, cache miss: the joined SELECT and building the Account;
* write_call_record with synchronous=FULL (fsync per commit, the default) and
  NORMAL, for a record with a 12-message ladder, from one thread and (FULL)
  from eight threads at once, where the group commit shares fsyncs.

Run: python3 bench/store.py [--lookups N] [--writes N]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kx_sipd.store import Store
from sansio_sip import CallRecordData, LadderEntry, Route


def per_call(function: Callable[[], object], count: int) -> float:
    """Best of three runs of ``count`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(count):
            function()
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def make_record(index: int) -> CallRecordData:
    message = (
        "INVITE sip:17752180264@sip.kx21.com SIP/2.0\r\n"
        + "".join(f"Header-{n}: {'x' * 40}\r\n" for n in range(12))
        + "\r\n"
    )
    ladder = tuple(
        LadderEntry(
            wall=1_700_000_000.0 + n,
            direction="in" if n % 2 else "out",
            leg="A" if n % 4 < 2 else "B",
            peer="198.51.100.7:5062",
            transport="UDP",
            message=message,
        )
        for n in range(12)
    )
    return CallRecordData(
        call_ref=f"bench-{index}",
        account="user1",
        a_call_id=f"{index}@client",
        b_call_id=f"{index}@kx",
        source="198.51.100.7:5062",
        transport="UDP",
        user_agent="bench",
        dialed="17752180264",
        sent_digits="17752180264",
        route="carrier",
        start_wall=1_700_000_000.0,
        end_wall=1_700_000_060.0,
        ended_by="client",
        final_status=200,
        ladder=ladder,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--writes", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.sqlite"
        with Store(path) as store:
            store.put_route(Route(name="carrier", host="203.0.113.5"))
            for index in range(1000):
                store.add_account(f"user{index}", "pw", route="carrier", allowed_prefixes=["1"])

            raw = sqlite3.connect(path, isolation_level=None)
            query = "SELECT ha1_md5 FROM accounts WHERE username = ?"
            reference = per_call(lambda: raw.execute(query, ("user500",)).fetchall(), args.lookups)
            pragma = per_call(lambda: raw.execute("PRAGMA data_version").fetchall(), args.lookups)
            raw.close()

            store.get_account("user500")
            hit = per_call(lambda: store.get_account("user500"), args.lookups)

            def miss() -> object:
                store._drop_cache()  # the bench measures the uncached path on purpose
                return store.get_account("user500")

            uncached = per_call(miss, args.lookups)

        writes: dict[str, float] = {}
        records = [make_record(index) for index in range(6 * args.writes)]
        for mode in ("FULL", "NORMAL"):
            with Store(path, synchronous=mode) as store:
                pending = iter(records)
                writes[mode] = per_call(
                    lambda: store.write_call_record(next(pending)),  # noqa: B023 (used in the loop)
                    args.writes,
                )

        # Eight writer threads at once (the AnyIO driver's worker threads): the
        # group commit shares one transaction and one fsync among queued writes.
        with Store(path) as store, ThreadPoolExecutor(max_workers=8) as pool:
            batch = records[: 4 * args.writes]
            start = time.perf_counter()
            list(pool.map(store.write_call_record, batch))
            concurrent = (time.perf_counter() - start) / len(batch) * 1e6

    print(f"reference: primary-key SELECT      {reference:8.2f} us")
    print(f"PRAGMA data_version (the check)    {pragma:8.2f} us  ({pragma / reference:.2f}x ref)")
    print(f"get_account, cache hit             {hit:8.2f} us  ({hit / reference:.2f}x ref)")
    print(
        f"get_account, cache miss            {uncached:8.2f} us  ({uncached / reference:.2f}x ref)"
    )
    print(f"cache hit / miss                   {hit / uncached:8.2f}")
    for mode, cost in writes.items():
        print(
            f"write_call_record, synchronous={mode:<6} {cost:8.1f} us  "
            f"({cost / reference:.0f}x ref)"
        )
    print(
        f"write_call_record, FULL, 8 threads {concurrent:8.1f} us per record "
        f"({writes['FULL'] / concurrent:.1f}x the single-thread rate)"
    )
    print(f"FULL / NORMAL                      {writes['FULL'] / writes['NORMAL']:8.2f}")


if __name__ == "__main__":
    main()
