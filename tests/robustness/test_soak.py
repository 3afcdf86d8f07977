"""A 60 s version of bench/soak.py (mixed registrations, calls through a SIPp
carrier, failed logins from many sources, bad packets): nothing fails, the
server stays up, and its memory at the end is within 25 % of what it was
after the warm-up: a gross leak (100 KB/s and more) fails it. A minute cannot
judge the issue's 10 % bound: it measures the engine's 300 s tables filling
and where the rarely-run cyclic collector happened to be (measured x1.10 to
x1.15 and more while every call was still a reference cycle, docs/robustness.md
finding #9); bench/soak.py's 12-minute run is the figure that counts.
Slow: runs only with KX_SLOW=1."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.interop,
    pytest.mark.skipif(os.environ.get("KX_SLOW") != "1", reason="slow: set KX_SLOW=1"),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="needs SIPp"),
]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_kx_soak", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_minute_of_mixed_traffic(tmp_path: Path) -> None:
    soak = _load()
    result = soak.soak(
        60.0, warmup=20.0, driver="anyio", register_rate=5.0, call_rate=2.0, call_seconds=3.0,
        bad_rate=50.0, failure_rate=2.0, directory=tmp_path,
    )  # fmt: skip
    print({k: v for k, v in result.items() if k != "rss_kib_samples"})
    assert result["alive_at_end"]
    assert result["registrations"]["failed"] == 0 and result["registrations"]["successful"] > 200
    assert result["calls"]["failed"] == 0 and result["calls"]["successful"] > 80
    assert result["bad_packets_sent"] > 1000
    assert result["rss_end_over_warmup"] < 1.25, result["rss_kib_samples"]
    engine = result["engine"]
    assert engine.get("dropped_malformed", 0) > 0 and engine.get("auth.bad-credentials", 0) > 0
