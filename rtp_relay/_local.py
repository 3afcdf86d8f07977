"""Running a relay as a child of the calling process (``kx-sipd serve``).

``start_local_relay(config)`` starts the supervisor as a child process
(``python -m rtp_relay``, config pickled on its stdin, so it works whatever
the caller's ``__main__`` looks like) and returns once every shard is
serving, or raises ``RelayStartError``. The child watches its parent and
stops when the parent disappears, so a killed kx-sipd does not leave a
relay holding the RTP range.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import select
import signal
import subprocess
import sys

import orjson

from sansio_sip import Address

from ._client import RelayClient
from ._config import RelayConfig
from ._supervisor import RelayStartError

__all__ = ["LocalRelay", "start_local_relay"]


class LocalRelay:
    """A relay supervisor running as our child process.

    ``control`` is its shared control address (the chosen port when the
    config asked for port 0); ``client()`` builds a RelayClient for it;
    ``stop()`` ends it (also called at interpreter exit).
    """

    def __init__(
        self, process: subprocess.Popen[bytes], config: RelayConfig, control: Address, shards: int
    ) -> None:
        self._process = process
        self.config = config
        self.control = control
        self.shards = shards
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        """The supervisor's process id."""
        return int(self._process.pid)

    @property
    def alive(self) -> bool:
        """Whether the supervisor process is still running."""
        return self._process.poll() is None

    def client(self, *, timeout: float = 0.5, retries: int = 3) -> RelayClient:
        """A client for this relay, sharing its secret."""
        return RelayClient(self.control, self.config.secret, timeout=timeout, retries=retries)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the supervisor to stop (SIGTERM), wait, kill it if it lingers. Idempotent."""
        atexit.unregister(self.stop)
        _end(self._process, timeout)

    def __enter__(self) -> LocalRelay:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_local_relay(config: RelayConfig, *, timeout: float = 30.0) -> LocalRelay:
    """Start a relay supervisor (and its shards) as a child process.

    Returns when every shard is serving. Raises RelayStartError when the
    relay cannot start (e.g. a control port is taken) or does not report
    within ``timeout`` seconds.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "rtp_relay"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(pickle.dumps((config, os.getpid())))
        process.stdin.close()
    except OSError:
        pass  # the child died at once; its exit is reported below
    line = b""
    if select.select([process.stdout], [], [], timeout)[0]:
        line = process.stdout.readline()
    process.stdout.close()
    try:
        message = orjson.loads(line) if line else {}
    except orjson.JSONDecodeError:
        message = {}
    if "ready" not in message:
        exited = process.poll() is not None or (line == b"" and _exits(process))
        _end(process)
        if message.get("error"):
            detail = message["error"]
        elif exited:
            detail = f"it exited with status {process.returncode} (see its log on stderr)"
        else:
            detail = f"no report within {timeout} s"
        raise RelayStartError(f"the relay did not start: {detail}")
    host, port = message["ready"]
    return LocalRelay(process, config, (str(host), int(port)), int(message["shards"]))


def _exits(process: subprocess.Popen[bytes], within: float = 2.0) -> bool:
    """Whether the process ends within ``within`` seconds (its stdout just closed)."""
    try:
        process.wait(within)
    except subprocess.TimeoutExpired:
        return False
    return True


def _end(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)
