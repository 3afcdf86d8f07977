"""Nothing is lost when the server is killed (SIGKILL, as a crash or an OOM
kill would): every finished call's record is in the database, and on restart
the calls that were up are closed with a record saying so (ended_by
"restart"). Calls go over the wire: SIPp as the client and as the carrier."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from robust_support import (
    KxServer,
    call_records,
    children_of,
    free_port,
    make_database,
    reap,
    sipp,
    start_sipp,
    stop_process,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("sipp") is None, reason="needs SIPp"),
]

FINISHED, UP = 3, 2


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_dash_nine_loses_no_record(tmp_path: Path) -> None:
    carrier_port = free_port()
    db = make_database(tmp_path / "kx.sqlite", carrier=("127.0.0.1", carrier_port))
    carrier = start_sipp(
        "carrier.xml", "-i", "127.0.0.1", "-p", str(carrier_port), "-m", "100",
        directory=tmp_path, name="carrier",
    )  # fmt: skip
    try:
        server = KxServer.start(tmp_path, "--media-timeout", "600", db=db, ipv6=False)
        relay_children = children_of(server.process.pid)
        talking = None
        try:
            finished = sipp(
                "call.xml", server.address, service="17752180264", directory=tmp_path,
                calls=FINISHED, rate=5, extra=("-d", "300"),
            )  # fmt: skip
            assert finished.returncode == 0, finished.stdout[-3000:]
            talking = start_sipp(
                "call.xml", "-i", "127.0.0.1", "-p", "0", "-s", "17752180264", "-au", "alice",
                "-ap", "alice-secret", "-r", "5", "-m", str(UP), "-d", "120000",
                f"127.0.0.1:{server.port}", directory=tmp_path, name="talking",
            )  # fmt: skip

            def both_up() -> bool:
                # Started (an open record) and answered (the 200 relayed to the client).
                started = [r for r in call_records(db) if r.end_wall is None]  # type: ignore[attr-defined]
                answered = [
                    e for e in server.log_events()
                    if e.get("event") == "transaction.answered"
                    and e["fields"]["method"] == "INVITE" and e["fields"]["status"] == 200  # type: ignore[index]
                ]  # fmt: skip
                return len(started) == UP and len(answered) == FINISHED + UP

            _wait_for(both_up, 30, "the two long calls to be answered")
            server.kill()  # SIGKILL: no shutdown, no flush
        finally:
            if talking is not None:
                stop_process(talking)
            reap(relay_children)
            server.kill()

        records = call_records(db)
        done = [r for r in records if r.end_wall is not None]  # type: ignore[attr-defined]
        assert len(done) == FINISHED, records
        for record in done:
            assert record.ended_by == "client" and record.final_status == 200, record  # type: ignore[attr-defined]
            assert record.answer_wall is not None and record.end_wall >= record.answer_wall  # type: ignore[attr-defined]
        open_calls = [r for r in records if r.end_wall is None]  # type: ignore[attr-defined]
        assert len(open_calls) == UP, records

        restarted = KxServer.start(tmp_path, "--media-timeout", "600", db=db, ipv6=False)
        try:
            records = call_records(db)
            closed = [r for r in records if r.ended_by == "restart"]  # type: ignore[attr-defined]
            assert len(closed) == UP, records
            for record in closed:
                assert record.end_wall is not None and record.reason, record  # type: ignore[attr-defined]
                assert record.end_wall >= record.start_wall  # type: ignore[attr-defined]
            assert len([r for r in records if r.ended_by == "client"]) == FINISHED  # type: ignore[attr-defined]
            assert all(r.end_wall is not None for r in records)  # type: ignore[attr-defined]
        finally:
            assert restarted.stop() == 0, restarted.log_tail()
    finally:
        stop_process(carrier)
