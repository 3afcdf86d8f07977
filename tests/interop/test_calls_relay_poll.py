"""A call ending while kx-sipd polls the relay for expired calls.

Seen in bench/calls.py at 25–50 calls/s: kx-sipd logged
``relay.failed operation=expired error=KeyError('<call_ref>')`` at level error.
``RelayClient.expired()`` lists its calls under its lock, releases the lock for
the round trip to the shards, then looks each listed call up again in
``self._calls``; a ``release()`` from a worker thread (a call hanging up) in
between removes it, and the look-up raises. The poll's results are lost with
it, including calls already taken from ``_lost`` (a dead shard's calls), which
are then never ended.

The interleaving is made deterministic here: the release happens inside the
poll's wait for replies, where another thread's release lands in production.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator

import pytest

from rtp_relay import LocalRelay, RelayClient, RelayConfig, start_local_relay

pytestmark = pytest.mark.interop


def _free_range(ports: int) -> tuple[int, int]:
    for _ in range(100):
        low = random.randrange(21000, 32000, 2)
        probes = []
        try:
            for port in range(low, low + ports):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return low, low + ports - 1
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def relay() -> Iterator[LocalRelay]:
    running = start_local_relay(
        RelayConfig(
            secret=os.urandom(32),
            control=("127.0.0.1", 0),
            rtp_range=_free_range(16),
            shards=1,
            media_host="127.0.0.1",
            log_level="warning",
        )
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(relay: LocalRelay) -> Iterator[RelayClient]:
    made = relay.client()
    try:
        yield made
    finally:
        made.close()


def test_expired_poll_survives_a_release_during_its_round_trip(client: RelayClient) -> None:
    ending = "call-" + os.urandom(6).hex()
    staying = "call-" + os.urandom(6).hex()
    client.allocate(ending, a_peer=("127.0.0.1", 40000), echo=False)
    client.allocate(staying, a_peer=("127.0.0.1", 40002), echo=False)
    wait_for_replies = client._await

    def replies_while_a_call_hangs_up(*args: object, **kwargs: object) -> object:
        replies = wait_for_replies(*args, **kwargs)  # type: ignore[arg-type]
        client.release(ending)  # another thread's BYE handling, mid-poll
        return replies

    client._await = replies_while_a_call_hangs_up  # type: ignore[method-assign]
    assert client.expired() == []
    client._await = wait_for_replies  # type: ignore[method-assign]
    client.release(staying)


def test_expired_poll_without_a_concurrent_release(client: RelayClient) -> None:
    """The same poll with nothing racing it: the control case of the test above."""
    call = "call-" + os.urandom(6).hex()
    client.allocate(call, a_peer=("127.0.0.1", 40004), echo=False)
    assert client.expired() == []
    client.release(call)
