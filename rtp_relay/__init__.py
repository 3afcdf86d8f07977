"""rtp_relay: kx-sipd's multiprocess RTP relay.

A supervisor process starts one shard process per CPU; each shard owns a
disjoint slice of the RTP port range and relays its calls' media with
symmetric latching, anti-hijack, RFC 4733 pass-through, echo mode, and
per-stream figures (DESIGN.md §5). kx-sipd controls it through
``RelayClient``, which implements ``sansio_sip.MediaRelay``; the control
protocol is described in docs/relay-protocol.md.

Public API: ``RelayConfig``, ``RelayClient`` (and its ``LoopRelay``), ``start_local_relay`` /
``LocalRelay`` (relay as a child process), ``run_supervisor`` (relay in
this process, for ``kx-sipd relay serve``) and ``RelayStartError``.
"""

from ._client import LoopRelay, RelayClient
from ._config import RelayConfig
from ._local import LocalRelay, start_local_relay
from ._supervisor import RelayStartError, run_supervisor

__all__ = [
    "LocalRelay",
    "LoopRelay",
    "RelayClient",
    "RelayConfig",
    "RelayStartError",
    "run_supervisor",
    "start_local_relay",
]
