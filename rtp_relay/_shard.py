"""One shard process: owns a slice of the RTP range and relays its calls' media.

The shard is a single-threaded epoll loop over non-blocking UDP sockets:

* two control sockets: the shared control port (bound by every shard with
  SO_REUSEPORT, so the kernel spreads commands sent to it) and the shard's
  own control port (``control + 1 + index``), where commands for calls it
  owns are sent;
* four media sockets per call (A RTP/RTCP facing the client, B RTP/RTCP
  facing the carrier; two in echo mode), bound when the call is allocated
  and closed when it is deleted, so a port outside a live call is not held
  and no stale datagram can reach a later call.

The per-packet path is: epoll event → dict lookup by fd → one
``recvfrom_into`` a preallocated buffer → ``Stream.receive`` (pure, ``_stream``) → ``sendto``
of a preallocated memoryview slice. Nothing else is allocated per packet
beyond the source address tuple the socket module returns.

Between packets, every ``STOP_CHECK`` seconds the loop checks for shutdown
and for an orphaned shard (the supervisor gone), and every ``HOUSEKEEPING``
seconds it finds media timeouts and reaps abandoned calls.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import logging
import os
import resource
import select
import signal
import socket
import time
from typing import Any, ClassVar

from sansio_sip import Address

from ._config import RelayConfig, shard_slices
from ._log import event, setup_logging
from ._protocol import BadDatagram, open_datagram, seal
from ._stream import CallMedia, Stream

__all__ = ["Shard", "shard_main"]

HOUSEKEEPING = 0.5
"""Seconds between media-timeout passes: bounds how late a timeout is noticed
(against a 60 s default), at the cost of one scan of the calls table."""
BATCH = 64
"""Control datagrams read from one socket per readiness event."""
BUFFER = 65536
VIEWS = 2048
"""Packet sizes up to this reuse a preallocated memoryview slice."""
REPLY_CACHE = 16384
"""Replies remembered by cookie, so a retransmitted command is answered with
the same reply instead of being executed twice."""
MAX_EXPIRED = 1000
"""Timed-out calls named per ``expired`` reply (keeps it inside one datagram)."""
MAX_LIST = 100
_MUTATING = frozenset({"allocate", "update", "delete"})
"""Operations whose replies are cached by cookie (the others are safe to repeat)."""
MEDIA_TOTALS = (
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "dropped_foreign",
    "dropped_malformed",
    "dropped_no_peer",
)
"""The per-stream figures a shard's ``stats`` sums over its live and ended calls."""
STOP_CHECK = 0.1
"""Seconds between checks of the shutdown event and of the supervisor's presence."""
FOREIGN_RETRY = 30.0
"""Seconds before retrying a port another process held when we tried to bind it."""


class Shard:
    """The state and loop of one shard. Built and run inside the shard process."""

    def __init__(self, config: RelayConfig, index: int, incarnation: int, restarts: int) -> None:
        self.config = config
        self.index = index
        self.incarnation = incarnation
        self.restarts = restarts
        self.secret = config.secret
        slices = shard_slices(config)
        self.slice = slices[index]
        self.free: collections.deque[int] = collections.deque(self.slice)
        self.foreign: dict[int, float] = {}
        self.family = socket.AF_INET6 if ":" in config.media_host else socket.AF_INET
        self.epoll = select.epoll()
        self.controls: dict[int, socket.socket] = {}
        # fd -> (recvfrom_into, Stream.receive, sendto of the twin's socket)
        self.media: dict[int, tuple[Any, Any, Any]] = {}
        self.calls: dict[str, tuple[CallMedia, list[socket.socket]]] = {}
        self.replies: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.counters: collections.Counter[str] = collections.Counter()
        self.closed_totals: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()
        self.table = [
            {
                "index": i,
                "port": config.shard_control(i)[1],
                "rtp": [ports[0], ports[-1] + 1] if ports else None,
            }
            for i, ports in enumerate(slices)
        ]

    # ------------------------------------------------------------ sockets

    def bind_controls(self) -> None:
        """Bind the shared control port (SO_REUSEPORT) and this shard's own one."""
        host = self.config.control[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for address, shared in (
            (self.config.control, True),
            (self.config.shard_control(self.index), False),
        ):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.setblocking(False)
            self.controls[sock.fileno()] = sock
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _bind_media(self, port: int) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.socket_buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.socket_buffer)
            sock.bind((self.config.media_host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _take_pair(self, now: float) -> tuple[int, socket.socket, socket.socket] | None:
        """The next free RTP port with its RTP and RTCP sockets bound, or None."""
        for _ in range(len(self.free)):
            port = self.free.popleft()
            held_until = self.foreign.get(port)
            if held_until is not None and held_until > now:
                self.free.append(port)
                continue
            try:
                rtp = self._bind_media(port)
            except OSError as exc:
                self._foreign(port, now, exc)
                continue
            try:
                rtcp = self._bind_media(port + 1)
            except OSError as exc:
                rtp.close()
                self._foreign(port, now, exc)
                continue
            self.foreign.pop(port, None)
            return port, rtp, rtcp
        return None

    def _foreign(self, port: int, now: float, exc: OSError) -> None:
        """Another process holds a port of our slice: skip it for a while."""
        self.foreign[port] = now + FOREIGN_RETRY
        self.free.append(port)
        self.counters["ports-held-elsewhere"] += 1
        event(
            logging.WARNING, "relay.port_unavailable", shard=self.index, port=port, error=str(exc)
        )

    # ------------------------------------------------------------ control commands

    def allocate(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """Reserve ports for a call (idempotent by call reference)."""
        call_ref = _call_ref(message)
        echo = message.get("echo", False)
        if not isinstance(echo, bool):
            raise _Refused("bad-request")
        a_peer = _peer(message.get("a_peer"))
        media_timeout = _media_timeout(message.get("media_timeout"))
        if call_ref in self.calls:
            return self._allocated(self.calls[call_ref][0])
        first = self._take_pair(now)
        second = None
        if first is not None and not echo:
            second = self._take_pair(now)
            if second is None:
                first[1].close()
                first[2].close()
                self.free.appendleft(first[0])
                first = None
        if first is None:
            self.counters["allocate-exhausted"] += 1
            event(
                logging.WARNING,
                "relay.ports_exhausted",
                shard=self.index,
                calls=len(self.calls),
                slice=self.table[self.index]["rtp"],
            )
            raise _Refused("exhausted")
        a_port, a_rtp, a_rtcp = first
        b_port, b_rtp, b_rtcp = second if second is not None else first
        call = CallMedia.build(
            call_ref,
            a_port=a_port,
            b_port=b_port,
            echo=echo,
            now=now,
            relatch_after=self.config.relatch_after,
        )
        call.set_peers(a_peer, None)
        call.media_timeout = media_timeout
        sockets = [a_rtp, a_rtcp] if echo else [a_rtp, a_rtcp, b_rtp, b_rtcp]
        wiring = [(a_rtp, call.a_rtp, b_rtp), (a_rtcp, call.a_rtcp, b_rtcp)]
        if not echo:
            wiring += [(b_rtp, call.b_rtp, a_rtp), (b_rtcp, call.b_rtcp, a_rtcp)]
        for sock, stream, out in wiring:
            self._register(sock, stream, out)
        self.calls[call_ref] = (call, sockets)
        self.counters["allocated"] += 1
        return self._allocated(call)

    def _register(self, sock: socket.socket, stream: Stream, out: socket.socket) -> None:
        self.media[sock.fileno()] = (sock.recvfrom_into, stream.receive, out.sendto)
        self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _allocated(self, call: CallMedia) -> dict[str, Any]:
        advertised = self.config.advertised
        return {"ok": True, "a": [advertised, call.a_port], "b": [advertised, call.b_port]}

    def update(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """Apply SDP peer addresses to a call's sides."""
        call = self._call(message)
        call.set_peers(_peer(message.get("a_peer")), _peer(message.get("b_peer")))
        call.set_events(
            _payload_type(message.get("a_events")), _payload_type(message.get("b_events"))
        )
        return {"ok": True}

    def delete(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """Free a call's ports and return its final per-leg figures."""
        call_ref = _call_ref(message)
        if call_ref not in self.calls:
            return {"ok": True, "unknown": True, "a": None, "b": None}
        call = self._release(call_ref)
        a_stats, b_stats = call.stats()
        self.counters["deleted"] += 1
        return {
            "ok": True,
            "a": _stats_dict(a_stats),
            "b": _stats_dict(b_stats) if b_stats is not None else None,
        }

    def _release(self, call_ref: str) -> CallMedia:
        call, sockets = self.calls.pop(call_ref)
        for sock in sockets:
            fd = sock.fileno()
            self.media.pop(fd, None)
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)
            sock.close()
        for stream in (call.a_rtp, call.a_rtcp) + (() if call.echo else (call.b_rtp, call.b_rtcp)):
            self._fold(stream)
        # Freed ports go to the back of the queue: the longest-free port is
        # reused first, so late packets of an ended call rarely meet a new one.
        self.free.append(call.a_port)
        if not call.echo:
            self.free.append(call.b_port)
        return call

    def _fold(self, stream: Stream) -> None:
        totals = self.closed_totals
        for key in MEDIA_TOTALS:
            totals[key] += getattr(stream, key)

    def query(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """One call's full figures."""
        return {"ok": True, "figures": self._call(message).figures(now=now)}

    def expired(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """Calls found without media for the media timeout (oldest first)."""
        timed_out = sorted(
            (call.timed_out, ref)
            for ref, (call, _s) in self.calls.items()
            if call.timed_out is not None
        )
        return {"ok": True, "timed_out": [ref for _t, ref in timed_out[:MAX_EXPIRED]]}

    def list_calls(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """A page of calls with their figures."""
        offset = message.get("offset", 0)
        limit = message.get("limit", MAX_LIST)
        if not isinstance(offset, int) or not isinstance(limit, int) or offset < 0 or limit < 1:
            raise _Refused("bad-request")
        refs = sorted(self.calls)[offset : offset + min(limit, MAX_LIST)]
        return {
            "ok": True,
            "total": len(self.calls),
            "calls": [self.calls[ref][0].figures(now=now) for ref in refs],
        }

    def stats(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """The shard's figures: calls, ports, packets (live and ended calls), drops."""
        # Every key, zeros included: an idle shard reports 0, not a missing figure.
        totals = {key: self.closed_totals[key] for key in MEDIA_TOTALS}
        for call, _sockets in self.calls.values():
            for stream in (call.a_rtp, call.a_rtcp, call.b_rtp, call.b_rtcp):
                for key in MEDIA_TOTALS:
                    totals[key] += getattr(stream, key)
        return {
            "ok": True,
            "pid": os.getpid(),
            "restarts": self.restarts,
            "uptime": round(now - self.started, 3),
            "cpu_s": round(sum(os.times()[:2]), 3),
            "calls": len(self.calls),
            "timed_out": sum(1 for c, _s in self.calls.values() if c.timed_out is not None),
            "rtp": self.table[self.index]["rtp"],
            "free_pairs": len(self.free),
            "media": totals,
            "counters": dict(self.counters),
        }

    def info(self, message: dict[str, Any], now: float) -> dict[str, Any]:
        """The shard table, so a client can address shards directly."""
        return {"ok": True, "shards": self.table, "advertised": self.config.advertised}

    def _call(self, message: dict[str, Any]) -> CallMedia:
        entry = self.calls.get(_call_ref(message))
        if entry is None:
            raise _Refused("unknown-call")
        return entry[0]

    # ------------------------------------------------------------ control plumbing

    OPS: ClassVar[dict[str, Any]] = {
        "allocate": allocate,
        "update": update,
        "delete": delete,
        "query": query,
        "expired": expired,
        "list": list_calls,
        "stats": stats,
        "info": info,
    }

    def on_control(self, sock: socket.socket) -> None:
        """Read and answer the control datagrams waiting on ``sock``."""
        for _ in range(BATCH):
            try:
                data, source = sock.recvfrom(BUFFER)
            except BlockingIOError:
                return
            except OSError:
                self.counters["control-recv-error"] += 1
                continue
            reply = self.handle_control(data, now=time.monotonic(), wall=time.time())
            if reply is not None:
                try:
                    sock.sendto(reply, source)
                except OSError:
                    self.counters["control-send-error"] += 1

    def handle_control(self, data: bytes, *, now: float, wall: float) -> bytes | None:
        """The sealed reply to one control datagram, or None to drop it (counted)."""
        try:
            message = open_datagram(self.secret, data)
        except BadDatagram as exc:
            self.counters[f"control-{exc.reason}"] += 1
            return None
        cookie = message["c"]
        cached = self.replies.get(cookie)
        if cached is not None:
            self.counters["control-retransmission"] += 1
            return cached
        stamp = message.get("ts")
        if not isinstance(stamp, int | float) or abs(wall - stamp) > self.config.max_skew:
            self.counters["control-stale"] += 1
            reply: dict[str, Any] = {"ok": False, "error": "stale-timestamp"}
        else:
            handler = self.OPS.get(message.get("op"))  # type: ignore[arg-type]
            if handler is None:
                self.counters["control-bad-op"] += 1
                reply = {"ok": False, "error": "unknown-op"}
            else:
                try:
                    reply = handler(self, message, now)
                except _Refused as exc:
                    reply = {"ok": False, "error": exc.reason}
                except Exception as exc:
                    # A bug: answer, count and log it; the shard keeps its calls.
                    self.counters["control-internal-error"] += 1
                    event(
                        logging.ERROR,
                        "relay.control_bug",
                        shard=self.index,
                        op=message.get("op"),
                        error=repr(exc),
                    )
                    reply = {"ok": False, "error": "internal-error"}
        reply["c"] = cookie
        reply["shard"] = self.index
        reply["inc"] = self.incarnation
        try:
            sealed = seal(self.secret, reply)
        except BadDatagram:
            sealed = seal(self.secret, {"c": cookie, "ok": False, "error": "too-large"})
        if message.get("op") in _MUTATING:
            self.replies[cookie] = sealed
            if len(self.replies) > REPLY_CACHE:
                self.replies.popitem(last=False)
        return sealed

    # ------------------------------------------------------------ housekeeping

    def housekeeping(self, now: float) -> None:
        """Media timeouts and reaping of abandoned timed-out calls."""
        timeout = self.config.media_timeout
        reap: list[str] = []
        for ref, (call, _sockets) in self.calls.items():
            if call.timed_out is None:
                if call.check_timeout(now=now, media_timeout=timeout):
                    self.counters["media-timeouts"] += 1
                    event(logging.INFO, "relay.media_timeout", shard=self.index, call=ref)
            elif now - call.timed_out >= self.config.reap_after:
                reap.append(ref)
        for ref in reap:
            self._release(ref)
            self.counters["reaped"] += 1
            event(logging.WARNING, "relay.call_reaped", shard=self.index, call=ref)

    def close(self) -> None:
        """Close every socket (shutdown)."""
        for ref in list(self.calls):
            self._release(ref)
        for sock in self.controls.values():
            sock.close()
        self.controls.clear()
        self.epoll.close()

    # ------------------------------------------------------------ the loop

    def run(self, should_stop: Any) -> None:
        """Serve until ``should_stop()`` is true (checked every STOP_CHECK seconds)."""
        buf = bytearray(BUFFER)
        whole = memoryview(buf)
        views = [whole[:n] for n in range(VIEWS + 1)]
        media = self.media
        controls = self.controls
        poll = self.epoll.poll
        clock = time.monotonic
        counters = self.counters
        next_housekeeping = clock() + HOUSEKEEPING
        next_stop_check = clock() + STOP_CHECK
        while True:
            for fd, _mask in poll(STOP_CHECK):
                entry = media.get(fd)
                if entry is None:
                    control = controls.get(fd)
                    if control is not None:
                        self.on_control(control)
                    continue
                recv_into, receive, send = entry
                # One datagram per readiness event: epoll is level-triggered, so a
                # socket with more queued is reported again by the next poll, and
                # no read ends in a failed syscall raising BlockingIOError.
                try:
                    size, source = recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError:
                    counters["media-recv-error"] += 1
                    continue
                try:
                    destination = receive(buf, size, source, clock())
                except Exception as exc:
                    # A bug in the stream logic must not take the shard's other calls down.
                    counters["media-internal-error"] += 1
                    event(logging.ERROR, "relay.media_bug", shard=self.index, error=repr(exc))
                    continue
                if destination is not None:
                    try:
                        send(views[size] if size <= VIEWS else whole[:size], destination)
                    except BlockingIOError:
                        counters["media-send-full"] += 1
                    except OSError:
                        counters["media-send-error"] += 1
            now = clock()
            if now >= next_stop_check:
                next_stop_check = now + STOP_CHECK
                if should_stop():
                    return
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING
                    self.housekeeping(now)


class _Refused(Exception):
    """A command that cannot be carried out; the reply names ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _call_ref(message: dict[str, Any]) -> str:
    call_ref = message.get("call")
    if not isinstance(call_ref, str) or not 0 < len(call_ref) <= 256:
        raise _Refused("bad-request")
    return call_ref


def _peer(value: Any) -> Address | None:
    """An address from a command (``[ip, port]`` or null); anything else is refused."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or not 0 < value[1] < 65536
    ):
        raise _Refused("bad-request")
    if not _is_ip(value[0]):
        raise _Refused("bad-request")
    return (value[0], value[1])


@functools.lru_cache(maxsize=4096)
def _is_ip(text: str) -> bool:
    """An IP literal? Cached: peers repeat (a carrier's media gateways)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _stats_dict(stats: Any) -> dict[str, Any]:
    return {
        "packets_in": stats.packets_in,
        "packets_out": stats.packets_out,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "packets_lost": stats.packets_lost,
        "jitter_ms": stats.jitter_ms,
    }


def shard_main(
    config: RelayConfig,
    index: int,
    incarnation: int,
    restarts: int,
    shutdown: Any,
    reports: Any,
    supervisor_pid: int,
    assignment: Any = None,
) -> None:
    """Entry point of a shard process (spawned by the supervisor).

    With an ``assignment`` connection the process is a warm spare: it waits
    (imports done, nothing bound) until the supervisor sends it the
    ``(index, incarnation, restarts)`` of a shard that died, so a restart
    costs a bind instead of an interpreter start. Then it binds the control
    sockets, reports ("ready" | "error", index, incarnation, detail) on
    ``reports``, and serves until ``shutdown`` is set or the supervisor
    disappears.
    """
    # The supervisor handles Ctrl-C for the whole relay and tells shards to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(config.log_level)
    _raise_fd_limit()

    def should_stop() -> bool:
        return bool(shutdown.is_set()) or os.getppid() != supervisor_pid

    if assignment is not None:
        while not assignment.poll(STOP_CHECK):
            if should_stop():
                return
        try:
            index, incarnation, restarts = assignment.recv()
        except EOFError:
            return
    shard = Shard(config, index, incarnation, restarts)
    try:
        shard.bind_controls()
    except OSError as exc:
        reports.put(("error", index, incarnation, f"control port: {exc}"))
        return
    reports.put(("ready", index, incarnation, os.getpid()))
    try:
        shard.run(should_stop)
    finally:
        shard.close()


def _raise_fd_limit() -> None:
    """Four sockets per call: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _media_timeout(value: Any) -> float | None:
    """A call's media timeout from ``allocate``: positive seconds, or absent/null
    for the relay's own."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e10:
        raise _Refused("bad-request")
    return float(value)


def _payload_type(value: Any) -> int | None:
    """A dynamic RTP payload type (96-127) from a control message, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 96 <= value <= 127:
        return value
    return None
