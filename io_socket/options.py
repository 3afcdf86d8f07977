"""What the blocking driver needs to know besides the engine: where to listen and
the bounds it keeps (STYLE.md §10: every queue bounded, every wait under a deadline).

io_anyio/options.py declares the same fields (this one adds ``tcp_send_buffer``),
so one set of settings drives either driver; the drivers do not import each other (DESIGN.md §1). Fields that
only the AnyIO driver uses (``input_queue``, ``tcp_send_queue``, ``worker_threads``,
``store_inline``, ``inline_budget``, ``inline_strikes``, ``inline_cooldown``,
``relay_timeout``: here every store and relay call is inline, and a connection's
unsent bytes are bounded by ``tcp_send_buffer``) are accepted here and ignored,
so that a settings mapping fits both.

Defaults and their reasoning (as in io_anyio):

* ``udp_batch`` = 64 datagrams read per wake-up of a UDP socket, so one busy
  socket cannot starve TCP connections and timers. Input beyond what the loop
  reads waits in the kernel's receive buffer (``udp_receive_buffer``, capped by
  rmem_max) and beyond that is dropped by the kernel (counted in its UDP
  "receive buffer errors"), never queued without limit.
* ``store_timeout`` and ``relay_timeout``: this driver calls the store and the
  relay inline, so it cannot abandon a slow call; the store's own busy timeout
  (200 ms for SQLite) and the relay client's retries (3 x 0.5 s) are what bound
  them. An account look-up that took longer than ``store_timeout`` is answered
  as unavailable (503), the answer io_anyio gives at that deadline.
  ``relay_timeout`` is not used here.
* ``tcp_idle_timeout`` = 3,600 s, ``max_tcp_connections`` = 4,096,
  ``max_tcp_per_ip`` = 64, ``grace_period`` = 30 s, ``drain_period`` = 5 s:
  see io_anyio/options.py.
* ``tcp_send_buffer`` = 1 MiB of unsent bytes per connection: a peer that
  lets more pile up is not reading and is closed.
"""

from __future__ import annotations

import attrs

from sansio_sip import Address

__all__ = ["DriverOptions"]


@attrs.frozen(kw_only=True)
class DriverOptions:
    """Listening addresses and the bounds of the driver (see the module docstring)."""

    listen: tuple[Address, ...] = (("0.0.0.0", 5060),)
    input_queue: int = 4096
    udp_batch: int = 64
    udp_receive_buffer: int = 4 * 1024 * 1024
    max_datagram: int = 65535
    tcp_read_size: int = 65536
    tcp_send_queue: int = 256
    tcp_send_buffer: int = 1024 * 1024
    max_tcp_connections: int = 4096
    max_tcp_per_ip: int = 64
    tcp_idle_timeout: float = 3600.0
    tcp_connect_timeout: float = 5.0
    store_timeout: float = 2.0
    store_inline: bool = True
    inline_budget: float = 0.005
    inline_strikes: int = 3
    inline_cooldown: float = 5.0
    relay_timeout: float = 2.0
    worker_threads: int = 16
    expire_poll: float = 1.0
    grace_period: float = 30.0
    drain_period: float = 5.0
    record_retry_max: float = 30.0
    handle_signals: bool = True
