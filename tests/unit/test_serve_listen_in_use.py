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
