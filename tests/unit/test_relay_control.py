"""Relay control protocol: framing (pure) and a shard's command handling in-process."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtp_relay import RelayConfig
from rtp_relay._config import shard_slices
from rtp_relay._protocol import MAGIC, BadDatagram, open_datagram, seal
from rtp_relay._shard import Shard

SECRET = b"s" * 32


def free_rtp_range(pairs: int) -> tuple[int, int]:
    """A range of 2*pairs ports below the ephemeral range, all free right now."""
    for _ in range(100):
        lo = random.randrange(21000, 32000, 2)
        hi = lo + 2 * pairs - 1
        probes = []
        try:
            for port in range(lo, hi + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(s)
                s.bind(("127.0.0.1", port))
            return lo, hi
        except OSError:
            continue
        finally:
            for s in probes:
                s.close()
    raise RuntimeError("no free port range")


# ------------------------------------------------------------------ framing


def test_seal_and_open_round_trip() -> None:
    message = {"c": "abc", "op": "info", "ts": 1.5, "x": [1, "y"]}
    assert open_datagram(SECRET, seal(SECRET, message)) == message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not-ours"),
        (b"GET / HTTP/1.1\r\n\r\n" * 3, "not-ours"),
        (seal(b"t" * 32, {"c": "a", "op": "info"}), "bad-tag"),
    ],
)
def test_rejected_datagrams(data: bytes, reason: str) -> None:
    with pytest.raises(BadDatagram) as info:
        open_datagram(SECRET, data)
    assert info.value.reason == reason


def test_tampered_body_is_rejected() -> None:
    data = bytearray(seal(SECRET, {"c": "a", "op": "delete", "call": "x"}))
    data[-3] ^= 1
    with pytest.raises(BadDatagram) as info:
        open_datagram(SECRET, bytes(data))
    assert info.value.reason == "bad-tag"


def test_authentic_but_malformed_body_is_rejected() -> None:
    import hashlib
    import hmac

    for body in (b"[1,2]", b"{not json", b'{"op":"info"}'):
        tag = hmac.new(SECRET, body, hashlib.sha256).digest()[:16]
        with pytest.raises(BadDatagram) as info:
            open_datagram(SECRET, MAGIC + tag + body)
        assert info.value.reason == "bad-body"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_message_or_bad_datagram(data: bytes) -> None:
    with contextlib.suppress(BadDatagram):
        assert isinstance(open_datagram(SECRET, data), dict)


def test_slices_are_disjoint_and_cover_the_range() -> None:
    config = RelayConfig(secret=SECRET, rtp_range=(20000, 20999), shards=3)
    slices = shard_slices(config)
    ports = [p for s in slices for p in s]
    assert len(slices) == 3
    assert ports == list(range(20000, 20999, 2))
    assert [len(s) for s in slices] == [166, 166, 168]  # cut in whole calls (two pairs)


@pytest.mark.parametrize(
    ("rtp_range", "shards", "expected"),
    [
        ((28810, 28813), 2, [2]),  # room for one call: one shard holds both pairs
        ((20000, 20009), 4, [2, 3]),  # 5 pairs: two calls, the odd pair goes to the last shard
        ((20000, 20001), 2, [1]),  # one pair: an echo call only
    ],
)
def test_small_ranges_never_strand_a_pair(
    rtp_range: tuple[int, int], shards: int, expected: list[int]
) -> None:
    config = RelayConfig(secret=SECRET, rtp_range=rtp_range, shards=shards)
    assert [len(s) for s in shard_slices(config)] == expected


def test_default_shard_count_is_one_per_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--relay-shards omitted (None): one shard per CPU, each with its own slice."""
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    config = RelayConfig(secret=SECRET)
    assert config.shards is None and config.rtp_range == (20000, 20999)
    assert config.shard_count == 3
    assert len(shard_slices(config)) == 3
    monkeypatch.setattr("os.cpu_count", lambda: None)  # unknown: one shard
    assert RelayConfig(secret=SECRET).shard_count == 1


def test_config_refuses_wildcard_advertised_address_and_short_secret() -> None:
    with pytest.raises(ValueError):
        RelayConfig(secret=SECRET, advertised="0.0.0.0")
    with pytest.raises(ValueError):
        RelayConfig(secret=b"short")
    with pytest.raises(ValueError):
        RelayConfig(secret=SECRET, rtp_range=(2000, 1000))


# ------------------------------------------------------------------ a shard's command handling


@pytest.fixture
def shard() -> Iterator[Shard]:
    config = RelayConfig(
        secret=SECRET,
        control=("127.0.0.1", 0),
        rtp_range=free_rtp_range(4),
        shards=1,
        media_host="127.0.0.1",
    )
    s = Shard(config, 0, incarnation=77, restarts=0)
    yield s
    s.close()


def command(
    shard: Shard, op: str, cookie: str = "", secret: bytes = SECRET, **fields: object
) -> dict[str, object] | None:
    message = {"c": cookie or random.randbytes(8).hex(), "op": op, "ts": time.time(), **fields}
    reply = shard.handle_control(seal(secret, message), now=time.monotonic(), wall=time.time())
    return None if reply is None else open_datagram(SECRET, reply)


def test_allocate_is_idempotent_by_cookie_and_by_call(shard: Shard) -> None:
    message = {
        "c": "cookie-1",
        "op": "allocate",
        "ts": time.time(),
        "call": "c1",
        "a_peer": None,
        "echo": False,
    }
    datagram = seal(SECRET, message)
    first = shard.handle_control(datagram, now=0.0, wall=time.time())
    again = shard.handle_control(datagram, now=0.1, wall=time.time())
    assert first is not None and first == again
    assert shard.counters["control-retransmission"] == 1
    other = command(shard, "allocate", call="c1", a_peer=None, echo=False)
    reply = open_datagram(SECRET, first)
    assert other is not None and other["a"] == reply["a"] and other["b"] == reply["b"]
    assert len(shard.calls) == 1
    assert reply["inc"] == 77


def test_retransmitted_delete_returns_the_same_figures(shard: Shard) -> None:
    command(shard, "allocate", call="c1", a_peer=["127.0.0.1", 4000], echo=False)
    first = command(shard, "delete", cookie="del-1", call="c1")
    again = command(shard, "delete", cookie="del-1", call="c1")
    assert first == again
    assert first is not None and first["ok"] and isinstance(first["a"], dict)
    fresh = command(shard, "delete", call="c1")
    assert fresh is not None and fresh["ok"] and fresh["a"] is None and fresh.get("unknown")


def test_bad_secret_is_ignored_and_counted(shard: Shard) -> None:
    assert command(shard, "allocate", secret=b"x" * 32, call="c1", a_peer=None, echo=False) is None
    assert shard.counters["control-bad-tag"] == 1
    assert not shard.calls


def test_stale_timestamp_is_refused(shard: Shard) -> None:
    message = {"c": "old", "op": "allocate", "ts": time.time() - 3600, "call": "c1", "echo": False}
    reply = shard.handle_control(seal(SECRET, message), now=0.0, wall=time.time())
    assert reply is not None
    assert open_datagram(SECRET, reply)["error"] == "stale-timestamp"
    assert not shard.calls


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "allocate", "call": "", "echo": False},
        {"op": "allocate", "call": "c", "echo": "yes"},
        {"op": "allocate", "call": "c", "echo": False, "a_peer": ["not-an-ip", 5]},
        {"op": "allocate", "call": "c", "echo": False, "a_peer": ["1.2.3.4", 70000]},
        {"op": "allocate", "call": 5, "echo": False},
        {"op": "allocate", "call": "c", "echo": False, "media_timeout": 0},
        {"op": "allocate", "call": "c", "echo": False, "media_timeout": -5},
        {"op": "allocate", "call": "c", "echo": False, "media_timeout": "30"},
        {"op": "allocate", "call": "c", "echo": False, "media_timeout": True},
        {"op": "list", "offset": -1},
    ],
)
def test_bad_requests_get_an_error_reply(shard: Shard, fields: dict[str, object]) -> None:
    op = str(fields.pop("op"))
    reply = command(shard, op, **fields)
    assert reply is not None and reply["ok"] is False and reply["error"] == "bad-request"
    assert not shard.calls


def test_a_call_times_out_after_its_own_media_timeout_when_allocate_names_one(
    shard: Shard,
) -> None:
    """kx-sipd's --media-timeout travels with each allocation, so it holds with a
    remote relay started with another one (here the relay's is 60 s)."""
    assert shard.config.media_timeout == 60.0
    assert command(shard, "allocate", call="short", echo=True, media_timeout=2.5)["ok"]  # type: ignore[index]
    assert command(shard, "allocate", call="default", echo=True)["ok"]  # type: ignore[index]
    created = shard.calls["short"][0].created
    shard.housekeeping(created + 2.4)
    assert command(shard, "expired")["timed_out"] == []  # type: ignore[index]
    shard.housekeeping(created + 2.6)
    assert command(shard, "expired")["timed_out"] == ["short"]  # type: ignore[index]
    shard.housekeeping(created + 59.0)
    assert command(shard, "expired")["timed_out"] == ["short"]  # type: ignore[index]
    shard.housekeeping(created + 60.1)
    assert command(shard, "expired")["timed_out"] == ["short", "default"]  # type: ignore[index]


def test_unknown_op_and_unknown_call(shard: Shard) -> None:
    reply = command(shard, "reboot")
    assert reply is not None and reply["error"] == "unknown-op"
    reply = command(shard, "update", call="nope", a_peer=None, b_peer=None)
    assert reply is not None and reply["error"] == "unknown-call"


def test_exhaustion_and_release(shard: Shard) -> None:
    # 4 pairs: two normal calls, then nothing; an echo call needs one pair.
    assert command(shard, "allocate", call="c1", echo=False)["ok"]  # type: ignore[index]
    assert command(shard, "allocate", call="c2", echo=False)["ok"]  # type: ignore[index]
    refused = command(shard, "allocate", call="c3", echo=True)
    assert refused is not None and refused["error"] == "exhausted"
    assert shard.counters["allocate-exhausted"] == 1
    command(shard, "delete", call="c1")
    echo = command(shard, "allocate", call="c3", echo=True)
    assert echo is not None and echo["ok"] and echo["a"] == echo["b"]


def test_port_held_by_another_process_is_skipped(shard: Shard) -> None:
    first = shard.slice[0]
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", first + 1))  # its RTCP port
    try:
        reply = command(shard, "allocate", call="c1", echo=False)
        assert reply is not None and reply["ok"]
        assert first not in (reply["a"][1], reply["b"][1])  # type: ignore[index]
        assert shard.counters["ports-held-elsewhere"] == 1
    finally:
        blocker.close()


def test_info_lists_the_shards(shard: Shard) -> None:
    reply = command(shard, "info")
    assert reply is not None
    assert reply["shards"] == [
        {
            "index": 0,
            "port": shard.config.control[1] + 1,
            "rtp": [shard.slice[0], shard.slice[-1] + 1],
        }
    ]
    assert orjson.dumps(reply)


def test_stats_of_an_idle_shard_report_every_media_figure_as_zero(shard: Shard) -> None:
    """An operator (or a script summing shards) reads 0 for a shard without calls,
    not a missing key."""
    reply = command(shard, "stats")
    assert reply is not None and reply["ok"]
    assert reply["calls"] == 0
    assert reply["media"] == {
        "packets_in": 0,
        "bytes_in": 0,
        "packets_out": 0,
        "bytes_out": 0,
        "dropped_foreign": 0,
        "dropped_malformed": 0,
        "dropped_no_peer": 0,
    }


def test_only_mutating_commands_are_answered_from_the_cache(shard: Shard) -> None:
    first = command(shard, "stats", cookie="same")
    command(shard, "allocate", call="c1", echo=False)
    again = command(shard, "stats", cookie="same")
    assert first is not None and again is not None
    assert (first["calls"], again["calls"]) == (0, 1)
    assert list(shard.replies) == [k for k in shard.replies if k != "same"]


def test_a_bug_in_a_handler_is_answered_and_counted(
    shard: Shard, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Shard, message: dict[str, object], now: float) -> dict[str, object]:
        raise ZeroDivisionError

    monkeypatch.setitem(Shard.OPS, "query", broken)
    reply = command(shard, "query", call="c1")
    assert reply is not None and reply["error"] == "internal-error"
    assert shard.counters["control-internal-error"] == 1
