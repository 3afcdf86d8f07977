"""`kx-sipd serve` on a SIP address another process holds: one clear line and
exit 2 on every driver, not a traceback; nothing it started is left running."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM], ids=["udp", "tcp"])
@pytest.mark.parametrize("driver", ["anyio", "socket"])
def test_a_taken_sip_port_is_one_line_and_exit_2(tmp_path: Path, driver: str, kind: int) -> None:
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        port = holder.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            metrics_port = probe.getsockname()[1]
        rtp_low = random.randrange(30000, 60000, 100)
        command = [
            sys.executable, "-m", "kx_sipd", "serve", "--demo",
            "--db", str(tmp_path / "kx.sqlite"),
            "--listen", f"127.0.0.1:{port}",
            "--driver", driver,
            "--metrics", f"127.0.0.1:{metrics_port}",
            "--relay-shards", "1",
            "--rtp-range", f"{rtp_low}-{rtp_low + 99}",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"kx-sipd: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert '"event":"listen.failed"' in done.stderr
    assert '"event":"relay.stopped"' in done.stderr  # the local relay was stopped


def test_local_relay_options_given_with_a_remote_relay_are_named_as_ignored(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        sip_port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "kx_sipd", "serve", "--demo",
        "--db", str(tmp_path / "kx.sqlite"),
        "--listen", f"127.0.0.1:{sip_port}",
        "--metrics", f"127.0.0.1:{metrics_port}",
        "--relay", "127.0.0.1:9", "--relay-secret", "0123456789abcdef",
        "--relay-shards", "3", "--rtp-range", "30000-30099",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if '"event":"server.started"' in line or len(lines) > 200:
                break
    finally:
        process.terminate()
        process.wait(timeout=30)
    warnings = [line for line in lines if '"event":"relay.options_ignored"' in line]
    assert len(warnings) == 1, "".join(lines)
    assert "--relay-shards,--rtp-range" in warnings[0]
    assert "--rtp-address" not in warnings[0]  # left at its default
