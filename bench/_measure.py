"""Measuring machinery shared by the bench scripts: instruction counts under
callgrind (parse.py, register_inprocess.py, calls_inprocess.py), and the
``--profile`` report of the in-process benches (the cyclic collector's share,
then the replay's own time split by layer, then the top functions)."""

from __future__ import annotations

import cProfile
import gc
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable


def instructions(script: str, *args: str) -> int:
    """Instructions callgrind counts for one run of ``python script args``
    (exits when valgrind is missing or reports no count)."""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    # A fixed hash seed: with a random one, the counts move by ~1 % between
    # runs (dict and set layouts differ), more than many changes measured.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, script, *args],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        sys.exit(proc.stderr[-2000:])
    return int(found.group(1))


Func = tuple[str, int, str]  # cProfile's key: (path, line, function name)


def split_by_layer(stats: pstats.Stats, layer_of: Callable[[Func], str | None]) -> dict[str, float]:
    """Own time per layer. ``layer_of`` names a function's layer, None for
    built-ins and generated code: their time is charged to their callers'
    layers, in proportion to the time each caller spent in them."""
    raw = stats.stats  # type: ignore[attr-defined]
    shares: dict[str, float] = {}

    def charge(func: Func, seconds: float, depth: int = 0) -> None:
        layer = layer_of(func)
        if layer is None and depth < 4:
            callers = raw.get(func, (0, 0, 0, 0, {}))[4]
            total = sum(c[2] for c in callers.values()) or 1.0
            if callers:
                for caller, c in callers.items():
                    charge(caller, seconds * c[2] / total, depth + 1)
                return
        layer = layer or "other"
        shares[layer] = shares.get(layer, 0.0) + seconds

    for func, (_, _, tt, _, _) in raw.items():
        charge(func, tt)
    return shares


def print_profile(
    replay: Callable[[], object],
    cpu: float,
    layer_of: Callable[[Func], str | None],
    *,
    top: int,
) -> None:
    """Profile ``replay`` (one whole replay, already timed at ``cpu`` seconds
    with the collector on) and print the report, split by ``layer_of``."""
    # Collections are paused while profiling: cProfile would charge each one
    # to whichever function allocated last. Their share is measured apart, as
    # the difference of two plain replays.
    gc.collect()
    gc.disable()
    try:
        t0 = time.process_time()
        replay()
        without_gc = time.process_time() - t0
        profiler = cProfile.Profile()
        profiler.enable()
        replay()
        profiler.disable()
    finally:
        gc.enable()
    stats = pstats.Stats(profiler)
    shares = split_by_layer(stats, layer_of)
    total = sum(shares.values())
    print(
        f"cyclic GC: {max(0.0, cpu - without_gc) / cpu:.0%} of the replay's CPU time; the "
        "rest, by layer (cProfile, own time, built-ins charged to their caller):"
    )
    for layer, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {layer:<30} {seconds / total:6.1%}")
    print("top functions by own time:")
    stats.sort_stats("tottime").print_stats(top)
