"""What the AnyIO driver needs to know besides the engine: where to listen and
the bounds it keeps (STYLE.md §10: every queue bounded, every wait under a deadline).

io_socket/options.py declares the same fields, so one set of settings drives
either driver; the drivers do not import each other (DESIGN.md §1).

Defaults and their reasoning:

* ``input_queue`` = 4,096 inputs waiting for the engine: about a second of the
  3,000 REGISTER/s target. A burst beyond that is older than a T1 retransmission
  interval by the time it would be read, so UDP input past the bound is dropped
  and counted rather than queued (the client retransmits).
* ``udp_batch`` = 64 datagrams read per wake-up of a UDP socket, so one busy
  socket cannot starve TCP connections and timers.
* ``store_timeout`` = 2 s for an account look-up or a record write: a softphone
  retransmits a REGISTER after 0.5, 1.5, 3.5 s; answering 503 within 2 s beats
  letting its transaction time out (Timer F = 32 s) on a hung database.
* ``store_inline`` on, ``inline_budget`` = 5 ms, ``inline_strikes`` = 3,
  ``inline_cooldown`` = 5 s: an
  account look-up is first tried inline in the loop, because the thread hop
  costs ~300 us against ~15 us for a cached SQLite look-up
  (bench/driver_lookup.py), which at 3,000 REGISTER/s is the difference
  between a tenth of a core and a whole one. A look-up that takes longer than
  the budget three times in a row, or fails once, sends every look-up to
  worker threads (under ``store_timeout``) for the cool-down, so a slow store
  stalls the loop a few times per cool-down, each for at most its own busy
  timeout (200 ms for SQLite). Three strikes, not one: on a loaded host the
  loop itself is preempted for milliseconds, and one such hiccup must not
  put the fast path away (it did, at every start, in bench/register.py).
  A look-up that overran without sleeping and without using its budget of
  CPU is no strike (Linux, per-thread rusage): the loop was only kept off the
  CPU by a busy host, which says nothing about the store (a slow store makes
  the loop sleep on a lock or the disk, or compute).
* ``relay_timeout`` = 2 s: the relay client retries on its own (3 x 0.5 s);
  this bounds the whole call.
* ``tcp_idle_timeout`` = 3,600 s: a NATed softphone on TCP is reachable only
  through its own connection, so closing it early would strand an in-dialog
  BYE; one hour outlives a register refresh (300 s) and most idle periods.
* ``max_tcp_connections`` = 4,096 and ``max_tcp_per_ip`` = 64: a file-descriptor
  budget well under the usual 65,536 limit, and enough for a NAT gateway in
  front of a call centre without letting one address take the whole budget.
* ``grace_period`` = 30 s for calls to end by themselves after SIGTERM, then
  every call gets a BYE; ``drain_period`` = 5 s for those BYE transactions and
  the last record writes before the process exits.
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
