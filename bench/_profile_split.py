"""The ``--profile`` report of the in-process benches (register_inprocess.py,
calls_inprocess.py): the cyclic collector's share, then the replay's own time
split by layer, then the top functions."""

from __future__ import annotations

import cProfile
import gc
import pstats
import time
from collections.abc import Callable


def print_profile(
    replay: Callable[[], object],
    cpu: float,
    split_by_layer: Callable[[pstats.Stats], dict[str, float]],
    *,
    top: int,
) -> None:
    """Profile ``replay`` (one whole replay, already timed at ``cpu`` seconds
    with the collector on) and print the report."""
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
    shares = split_by_layer(stats)
    total = sum(shares.values())
    print(
        f"cyclic GC: {max(0.0, cpu - without_gc) / cpu:.0%} of the replay's CPU time; the "
        "rest, by layer (cProfile, own time, built-ins charged to their caller):"
    )
    for layer, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {layer:<30} {seconds / total:6.1%}")
    print("top functions by own time:")
    stats.sort_stats("tottime").print_stats(top)
