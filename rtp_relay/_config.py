"""The relay's tunables, in one frozen object the supervisor pickles to each shard.

Defaults and their reasoning:

* ``rtp_range`` 20000–20999: the customer's guide (§1, §6) promises exactly
  this range to integrators' firewalls.
* ``shards`` None → one per CPU: a shard is a single-threaded loop, so more
  shards than CPUs only adds context switches.
* ``media_timeout`` 60 s: long enough for a call on hold without media
  (most softphones keep sending while on hold; one minute covers those that
  do not send comfort noise), short enough that a dead call stops costing
  a port pair and carrier minutes quickly.
* ``relatch_after`` 0.5 s: a latched source must have been silent this long
  before a new source may take its stream over (and only with a new SSRC,
  see ``_stream``). 25 packet times at 20 ms is far beyond jitter and
  normal packet gaps, and still short enough that a caller who switched
  networks loses only half a second of audio.
* ``reap_after`` 60 s: a call the relay reported as timed out but nobody
  deleted (the controller died) is freed this much later.
* ``max_skew`` 30 s: a control command whose timestamp is further from the
  relay's clock is refused, which bounds how long a captured command can be
  replayed (the reply cache answers replays within the window).
"""

from __future__ import annotations

import ipaddress
import os

import attrs

from sansio_sip import Address

__all__ = ["RelayConfig", "shard_slices"]


def _check_range(_inst: object, _attr: object, value: tuple[int, int]) -> None:
    lo, hi = value
    if not (1024 <= lo < hi <= 65535):
        raise ValueError(f"rtp_range {lo}-{hi} must lie within 1024-65535 with lo < hi")


def _check_ip(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{attribute.name} must be an IP literal, got {value!r}") from None


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Everything a supervisor and its shards need.

    ``control`` is the shared control address every shard binds with
    SO_REUSEPORT; port 0 lets the supervisor pick a free block. Shard ``i``
    also answers on its own control port ``control[1] + 1 + i`` (same host).
    ``media_host`` is where the RTP sockets are bound (may be a wildcard);
    ``advertised`` is the address written into SDP and allocate replies and
    must be a concrete address (behind 1:1 NAT, the public one).
    """

    secret: bytes = attrs.field(repr=False)
    control: Address = ("127.0.0.1", 22220)
    rtp_range: tuple[int, int] = attrs.field(default=(20000, 20999), validator=_check_range)
    shards: int | None = None
    media_host: str = attrs.field(default="0.0.0.0", validator=_check_ip)
    advertised: str = attrs.field(default="127.0.0.1", validator=_check_ip)
    media_timeout: float = 60.0
    relatch_after: float = 0.5
    reap_after: float = 60.0
    max_skew: float = 30.0
    socket_buffer: int = 1 << 20
    log_level: str = "info"

    @secret.validator
    def _check_secret(self, _attribute: object, value: bytes) -> None:
        if len(value) < 16:
            raise ValueError("the relay secret must be at least 16 bytes")

    @advertised.validator
    def _check_advertised(self, _attribute: object, value: str) -> None:
        if ipaddress.ip_address(value).is_unspecified:
            raise ValueError("the advertised media address must not be a wildcard")

    @property
    def shard_count(self) -> int:
        """The number of shards, resolving None to the CPU count, and never more
        shards than whole calls (two port pairs each) fit in the range."""
        wanted = self.shards if self.shards is not None else (os.cpu_count() or 1)
        return max(1, min(wanted, len(_pairs(self.rtp_range)) // 2))

    def shard_control(self, index: int) -> Address:
        """Shard ``index``'s own control address."""
        return (self.control[0], self.control[1] + 1 + index)


def _pairs(rtp_range: tuple[int, int]) -> list[int]:
    """The even RTP ports of the range whose RTCP port (RTP + 1) is also inside it."""
    lo, hi = rtp_range
    first = lo + (lo & 1)
    return list(range(first, hi, 2))


def shard_slices(config: RelayConfig) -> list[list[int]]:
    """The disjoint RTP-port slices, one per shard, as contiguous runs of even ports.

    Slices are cut in whole calls (two pairs), so no shard is left with a pair
    it can never use for a call; an odd last pair goes to the last shard (an
    echo call needs only one).
    """
    pairs = _pairs(config.rtp_range)
    count = config.shard_count
    calls = len(pairs) // 2
    bounds = [2 * (calls * i // count) for i in range(count)] + [len(pairs)]
    return [pairs[bounds[i] : bounds[i + 1]] for i in range(count)]
