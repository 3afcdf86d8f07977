"""``kx-sipd serve`` settles the cyclic collector once it is up (kx_sipd/app.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from kx_sipd.app import GC_THRESHOLDS, settle_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_settle_gc_freezes_start_up_and_raises_thresholds(restored_gc: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    settle_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.isenabled()


def test_cycles_made_after_settling_are_collected_without_asking(restored_gc: None) -> None:
    settle_gc()

    class Node:
        other: object = None

    collected: list[str] = []
    a, b = Node(), Node()
    a.other, b.other = b, a
    weakref.finalize(a, collected.append, "a")
    del a, b
    # Net allocations past the young generation's threshold start a collection.
    kept = [[] for _ in range(GC_THRESHOLDS[0] + 1000)]
    assert collected == ["a"]
    assert len(kept) > GC_THRESHOLDS[0]
