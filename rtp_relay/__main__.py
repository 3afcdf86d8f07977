"""``python -m rtp_relay``: the relay supervisor as a child of kx-sipd.

Used by ``start_local_relay``: the pickled ``(RelayConfig, parent_pid)``
arrives on stdin (so the secret never shows in the process list), and one
JSON line on stdout reports ``{"ready": [host, port], "shards": n}`` or
``{"error": message}``. Operators run a standalone relay with
``kx-sipd relay serve`` instead.
"""

import pickle
import sys

import orjson

from ._supervisor import run_supervisor


class _LineReporter:
    """Turns the supervisor's ready message into one JSON line on stdout."""

    def send(self, message: tuple[object, ...]) -> None:
        if message[0] == "ready":
            line = {"ready": list(message[1]), "shards": message[2]}  # type: ignore[call-overload]
        else:
            line = {"error": str(message[1])}
        sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
        sys.stdout.buffer.flush()


def main() -> int:
    """Run the supervisor with the config read from stdin."""
    config, parent_pid = pickle.load(sys.stdin.buffer)
    return run_supervisor(config, ready=_LineReporter(), parent_pid=parent_pid)


if __name__ == "__main__":
    sys.exit(main())
