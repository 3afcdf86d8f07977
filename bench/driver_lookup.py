"""What an account look-up costs the AnyIO driver: inline call vs worker-thread hop.

At the 3,000 authenticated REGISTER/s target every REGISTER with credentials
costs one ``store.get_account``. io_anyio runs it in a worker thread under a
deadline (``anyio.to_thread.run_sync`` with a limiter), so a hung database
cannot stall the loop. This prints, for the real SQLite store with its cache
warm, the look-ups per second of a plain inline call (the reference, measured
in the same run) and of the thread hop on each event loop, with the hop's cost
as a ratio and in microseconds per look-up.

    python3 bench/driver_lookup.py [--count N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread

from kx_sipd.store import Store


def _inline(store: Store, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        store.get_account("alice")
    return time.perf_counter() - start


async def _hop(store: Store, count: int, concurrency: int) -> float:
    limiter = anyio.CapacityLimiter(16)
    per_task = count // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            with anyio.fail_after(2.0):
                await anyio.to_thread.run_sync(
                    store.get_account, "alice", limiter=limiter, abandon_on_cancel=True
                )

    start = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for _ in range(concurrency):
            tasks.start_soon(worker)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "bench.sqlite")
        store.add_account("alice", "pw")
        store.get_account("alice")  # warm the cache
        reference = _inline(store, args.count)
        print(
            f"inline get_account (reference): {args.count / reference:10.0f} /s"
            f"  {reference / args.count * 1e6:6.1f} us each"
        )
        runs = [("asyncio", {}), ("asyncio", {"use_uvloop": True}), ("trio", {})]
        for backend, options in runs:
            name = backend + ("+uvloop" if options else "")
            for concurrency in (1, 16):
                elapsed = anyio.run(
                    _hop, store, args.count, concurrency, backend=backend, backend_options=options
                )
                done = args.count // concurrency * concurrency
                print(
                    f"thread hop {name:14s} x{concurrency:<2d}: {done / elapsed:10.0f} /s"
                    f"  {elapsed / done * 1e6:6.1f} us each"
                    f"  ({elapsed / done / (reference / args.count):5.1f}x inline)"
                )
        store.close()


if __name__ == "__main__":
    main()
