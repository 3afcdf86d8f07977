"""A short flood (bench/flood.py) at many times the server's capacity: the
server answers 503 with Retry-After or drops, never crashes, its memory stays
bounded, and a normal REGISTER succeeds again soon after the flood stops.
The figures go to stdout (``-s``); nothing here asserts speed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from robust_support import KxServer

BENCH = Path(__file__).resolve().parents[2] / "bench" / "flood.py"
RSS_HEADROOM_KIB = 200 * 1024  # far above what the bounded tables can hold at these limits


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_kx_flood", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FLOOD = _load()


def _flood(server: KxServer, seconds: float) -> dict[str, object]:
    result: dict[str, object] = FLOOD.run(server.address, seconds=seconds, senders=2, server=server)
    print({k: v for k, v in result.items() if k != "rss_kib_samples"})
    return result


def test_flood_with_the_default_limits(tmp_path: Path) -> None:
    server = KxServer.start(tmp_path, "--log-level", "warning", ipv6=False)
    try:
        result = _flood(server, 6.0)
        assert server.alive, server.log_tail()
        assert result["overload_factor"] is not None and result["overload_factor"] > 3  # type: ignore[operator]
        assert result["dropped"] > 0  # type: ignore[operator]
        assert result["503_without_retry_after"] == 0
        assert result["recovery_s"] is not None, "normal REGISTER never succeeded again"
        before, peak = result["rss_kib_before"], result["rss_kib_peak"]
        assert peak < before + RSS_HEADROOM_KIB, (before, peak)  # type: ignore[operator]
    finally:
        assert server.stop() == 0, server.log_tail()


def test_flood_past_the_transaction_limit_is_answered_503(tmp_path: Path) -> None:
    server = KxServer.start(
        tmp_path, "--log-level", "info", "--max-transactions", "300", ipv6=False
    )
    try:
        result = _flood(server, 5.0)
        assert server.alive, server.log_tail()
        answers = result["answers"]
        assert isinstance(answers, dict) and answers.get("503", 0) > 0, answers
        assert result["503_without_retry_after"] == 0
        # Lingering transactions (Timer J, 32 s on UDP) hold the table after the
        # flood; then normal service is back.
        assert result["recovery_s"] is not None, "normal REGISTER never succeeded again"
    finally:
        assert server.stop() == 0, server.log_tail()
    stats = server.exit_stats()
    assert stats.get("overload_rejected", 0) > 0, stats
