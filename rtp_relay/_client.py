"""The relay client kx-sipd uses (implements ``sansio_sip.MediaRelay``).

Blocking and thread-safe: the AnyIO driver calls it from worker threads.
Each thread gets its own UDP socket (so replies never cross threads), and
the table of calls is guarded by one lock held only around dictionary work,
never across network waits.

Balancing. The client first asks the shared control port for the shard
table (``info``), then spreads new calls itself: each allocation goes to the
next shard in round-robin order, straight to that shard's own control port,
and moves on to the next shard when one answers "exhausted" or does not
answer, so a call fails with ``MediaUnavailable`` only when *every* shard is
full or silent. This replaces relying on the kernel's SO_REUSEPORT hash of
our source port, which would pin a single-socket client to one shard. Later
commands for a call go to the shard that allocated it.

Reliability. A command is retransmitted after ``timeout`` seconds, up to
``retries`` times, as the *same* datagram (same cookie): the shard answers a
retransmission from its reply cache, so a command whose reply was lost is
never carried out twice.

Loss of a shard. Every reply names the shard's incarnation; ``expired()``
polls the shards holding our calls and reports the calls of a shard whose
incarnation changed (it was restarted, empty) or that stayed silent for
``lost_after`` consecutive polls, as "relay-lost", and calls the relay found
without media as "media-timeout".
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from typing import Any

import attrs

from sansio_sip import Address, MediaAllocation, MediaStats, MediaUnavailable

from ._protocol import BadDatagram, open_datagram, seal

__all__ = ["RelayClient"]

LOG = logging.getLogger("rtp_relay.client")


class _NoReply(Exception):
    """No reply within the retransmission budget."""


@attrs.frozen
class _Placement:
    shard: int
    incarnation: int
    allocation: MediaAllocation


class RelayClient:
    """Talks to a relay's control port. See the module docstring.

    ``control`` is the relay's shared control address, ``secret`` the shared
    HMAC key; ``timeout`` is the wait per attempt, ``retries`` the number of
    retransmissions after the first attempt.
    """

    def __init__(
        self,
        control: Address,
        secret: bytes,
        *,
        timeout: float = 0.5,
        retries: int = 3,
        lost_after: int = 3,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the relay secret must be at least 16 bytes")
        self.control = control
        self._secret = secret
        self.timeout = timeout
        self.retries = max(0, retries)
        self.lost_after = lost_after
        self._family = socket.AF_INET6 if ":" in control[0] else socket.AF_INET
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._shards: dict[int, Address] = {}
        self._refresh = True
        self._round_robin = itertools.count()
        self._calls: dict[str, _Placement] = {}
        self._reported: set[str] = set()
        self._lost: list[tuple[str, str]] = []
        self._misses: dict[int, int] = {}

    # ------------------------------------------------------------ transport

    def _socket(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(self._family, socket.SOCK_DGRAM)
            self._local.sock = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def _request(self, op: str, **fields: Any) -> tuple[str, bytes]:
        cookie = os.urandom(8).hex()
        message = {"c": cookie, "op": op, "ts": time.time(), **fields}
        return cookie, seal(self._secret, message)

    def _exchange(
        self, address: Address, op: str, *, attempts: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one command to ``address`` and wait for its reply, retransmitting
        the same datagram. Raises _NoReply."""
        cookie, datagram = self._request(op, **fields)
        sock = self._socket()
        for _attempt in range(attempts if attempts is not None else 1 + self.retries):
            try:
                sock.sendto(datagram, address)
            except OSError as exc:
                LOG.debug("relay control send to %s failed: %s", address, exc)
            reply = self._await(sock, {cookie}, time.monotonic() + self.timeout)
            if reply:
                return reply[cookie]
        raise _NoReply(f"{op} to {address[0]}:{address[1]}")

    def _await(
        self, sock: socket.socket, cookies: set[str], deadline: float
    ) -> dict[str, dict[str, Any]]:
        """Replies for ``cookies`` until all came or the deadline passed.
        Stale replies (earlier cookies) and forged datagrams are discarded."""
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < len(cookies):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            except ConnectionRefusedError:
                continue  # an ICMP error about an earlier send: keep waiting
            except OSError:
                break  # the socket was closed under us (close()): give up waiting
            try:
                reply = open_datagram(self._secret, data)
            except BadDatagram:
                continue
            if reply["c"] in cookies:
                replies[reply["c"]] = reply
        return replies

    def _shard_table(self) -> dict[int, Address]:
        """The shards' control addresses, asked once from the shared control port."""
        with self._lock:
            if self._shards and not self._refresh:
                return dict(self._shards)
        try:
            reply = self._exchange(self.control, "info")
        except _NoReply:
            raise MediaUnavailable(
                f"relay at {self.control[0]}:{self.control[1]} does not answer"
            ) from None
        if not reply.get("ok"):
            raise MediaUnavailable(f"relay refused info: {reply.get('error')}")
        try:
            table = {int(s["index"]): (self.control[0], int(s["port"])) for s in reply["shards"]}
        except (KeyError, TypeError, ValueError):
            raise MediaUnavailable("malformed info reply from the relay") from None
        if not table:
            raise MediaUnavailable("the relay has no shards")
        with self._lock:
            self._shards = table
            self._refresh = False
        return dict(table)

    # ------------------------------------------------------------ MediaRelay

    def allocate(self, call_ref: str, *, a_peer: Address | None, echo: bool) -> MediaAllocation:
        """Reserve ports for a call (two pairs, or one for echo). Idempotent per
        ``call_ref``. Raises MediaUnavailable when every shard is full or silent."""
        with self._lock:
            placed = self._calls.get(call_ref)
        if placed is not None:
            return placed.allocation
        table = self._shard_table()
        order = sorted(table)
        start = next(self._round_robin) % len(order)
        exhausted = 0
        for index in order[start:] + order[:start]:
            try:
                reply = self._exchange(
                    table[index],
                    "allocate",
                    call=call_ref,
                    a_peer=list(a_peer) if a_peer else None,
                    echo=echo,
                )
            except _NoReply:
                LOG.warning("relay shard %d at %s does not answer", index, table[index])
                continue
            if reply.get("ok"):
                try:
                    allocation = MediaAllocation(
                        call_ref=call_ref,
                        a_address=str(reply["a"][0]),
                        a_port=int(reply["a"][1]),
                        b_address=str(reply["b"][0]),
                        b_port=int(reply["b"][1]),
                    )
                    placement = _Placement(index, int(reply["inc"]), allocation)
                except (KeyError, IndexError, TypeError, ValueError):
                    raise MediaUnavailable("malformed allocate reply from the relay") from None
                with self._lock:
                    self._calls[call_ref] = placement
                return allocation
            if reply.get("error") != "exhausted":
                raise MediaUnavailable(f"relay refused allocate: {reply.get('error')}")
            exhausted += 1
        if exhausted == len(order):
            LOG.warning("relay ports exhausted on all %d shards", len(order))
            raise MediaUnavailable("relay ports exhausted")
        with self._lock:
            # Ask for the table again next time (the relay may have been
            # restarted with other shards); keep this one meanwhile, since
            # live calls are addressed through it.
            self._refresh = True
        raise MediaUnavailable("relay shards do not answer")

    def update(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None = None,
        b_events: int | None = None,
    ) -> None:
        """Tell the relay the SDP addresses of each side, and each side's
        telephone-event payload type. Raises MediaUnavailable."""
        placed, address = self._placement(call_ref)
        if placed is None or address is None:
            raise MediaUnavailable(f"no relay allocation for {call_ref}")
        try:
            reply = self._exchange(
                address,
                "update",
                call=call_ref,
                a_peer=list(a_peer) if a_peer else None,
                b_peer=list(b_peer) if b_peer else None,
                a_events=a_events,
                b_events=b_events,
            )
        except _NoReply:
            raise MediaUnavailable("relay shard does not answer") from None
        if not reply.get("ok") or reply.get("inc") != placed.incarnation:
            raise MediaUnavailable(f"relay refused update: {reply.get('error', 'shard restarted')}")

    def release(self, call_ref: str) -> tuple[MediaStats | None, MediaStats | None]:
        """Free a call's ports; its final (A-leg, B-leg) figures, or (None, None)
        when the relay lost the call or does not answer (logged)."""
        placed, address = self._placement(call_ref)
        with self._lock:
            self._calls.pop(call_ref, None)
            self._reported.discard(call_ref)
        if placed is None or address is None:
            return None, None
        try:
            reply = self._exchange(address, "delete", call=call_ref)
        except _NoReply:
            LOG.warning(
                "relay did not answer delete of %s; its ports are freed by the media timeout",
                call_ref,
            )
            return None, None
        if not reply.get("ok") or reply.get("inc") != placed.incarnation:
            return None, None
        return _media_stats(reply.get("a")), _media_stats(reply.get("b"))

    def expired(self) -> list[tuple[str, str]]:
        """Calls the relay ended on its own since the last poll: (call_ref,
        "media-timeout" | "relay-lost"). One round trip to each shard holding
        our calls, in parallel, without retransmission (the next poll is the retry)."""
        with self._lock:
            found, self._lost = self._lost, []
            by_shard: dict[int, list[str]] = {}
            for call_ref, placed in self._calls.items():
                by_shard.setdefault(placed.shard, []).append(call_ref)
            shards = dict(self._shards)
        if not by_shard:
            return found
        sock = self._socket()
        pending: dict[str, int] = {}
        for index in by_shard:
            address = shards.get(index)
            if address is None:
                continue
            cookie, datagram = self._request("expired")
            pending[cookie] = index
            try:
                sock.sendto(datagram, address)
            except OSError as exc:
                LOG.debug("relay poll to %s failed: %s", address, exc)
        replies = self._await(sock, set(pending), time.monotonic() + self.timeout)
        answered = {pending[c]: r for c, r in replies.items()}
        with self._lock:
            for index, refs in by_shard.items():
                reply = answered.get(index)
                if reply is None or not reply.get("ok"):
                    self._misses[index] = self._misses.get(index, 0) + 1
                    if self._misses[index] >= self.lost_after:
                        LOG.warning(
                            "relay shard %d silent for %d polls: its calls are lost",
                            index,
                            self._misses[index],
                        )
                        found += self._forget(refs)
                    continue
                self._misses[index] = 0
                incarnation = reply.get("inc")
                # A call may have been released by another thread during the round trip.
                stale = [
                    r
                    for r in refs
                    if r in self._calls and self._calls[r].incarnation != incarnation
                ]
                if stale:
                    LOG.warning("relay shard %d restarted: %d calls lost", index, len(stale))
                    found += self._forget(stale)
                timed_out = reply.get("timed_out")
                for call_ref in timed_out if isinstance(timed_out, list) else []:
                    owner = self._calls.get(call_ref)
                    if (
                        owner is not None
                        and owner.shard == index
                        and call_ref not in self._reported
                    ):
                        self._reported.add(call_ref)
                        found.append((call_ref, "media-timeout"))
        return found

    def _forget(self, refs: list[str]) -> list[tuple[str, str]]:
        """Drop lost calls (lock held) and name those still ours; release() of
        them then returns no figures."""
        lost = []
        for call_ref in refs:
            if self._calls.pop(call_ref, None) is not None:
                lost.append((call_ref, "relay-lost"))
            self._reported.discard(call_ref)
        return lost

    def _placement(self, call_ref: str) -> tuple[_Placement | None, Address | None]:
        with self._lock:
            placed = self._calls.get(call_ref)
            address = self._shards.get(placed.shard) if placed is not None else None
        return placed, address

    # ------------------------------------------------------------ operator queries

    def shard_stats(self) -> list[dict[str, Any]]:
        """Every shard's figures (the ``stats`` command), in shard order; a
        silent shard appears as ``{"index": i, "error": "no reply"}``."""
        table = self._shard_table()
        out = []
        for index in sorted(table):
            try:
                reply = self._exchange(table[index], "stats")
            except _NoReply:
                out.append({"index": index, "error": "no reply"})
                continue
            reply["index"] = index
            out.append(reply)
        return out

    def shard_calls(self, index: int) -> list[dict[str, Any]]:
        """Every call of one shard with its figures (paged ``list`` commands)."""
        address = self._shard_table()[index]
        calls: list[dict[str, Any]] = []
        for _page in range(10_000):
            try:
                reply = self._exchange(address, "list", offset=len(calls), limit=100)
            except _NoReply:
                raise MediaUnavailable(f"relay shard {index} does not answer") from None
            page = reply.get("calls", [])
            calls += page
            if not page or len(calls) >= reply.get("total", 0):
                break
        return calls

    def query(self, call_ref: str) -> dict[str, Any] | None:
        """One of our calls' full figures, or None when unknown."""
        placed, address = self._placement(call_ref)
        if placed is None or address is None:
            return None
        try:
            reply = self._exchange(address, "query", call=call_ref)
        except _NoReply:
            raise MediaUnavailable("relay shard does not answer") from None
        figures: dict[str, Any] | None = reply.get("figures") if reply.get("ok") else None
        return figures

    def close(self) -> None:
        """Close the client's sockets (of every thread)."""
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
        self._local = threading.local()


def _media_stats(value: Any) -> MediaStats | None:
    if not isinstance(value, dict):
        return None
    try:
        return MediaStats(
            packets_in=int(value.get("packets_in", 0)),
            packets_out=int(value.get("packets_out", 0)),
            bytes_in=int(value.get("bytes_in", 0)),
            bytes_out=int(value.get("bytes_out", 0)),
            packets_lost=int(value.get("packets_lost", 0)),
            jitter_ms=float(value.get("jitter_ms", 0.0)),
        )
    except (TypeError, ValueError):
        LOG.warning("malformed media figures from the relay: %r", value)
        return None
