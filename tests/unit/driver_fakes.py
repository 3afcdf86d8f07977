"""Test doubles for the driver tests: a tiny line-command engine, a store and a relay.

The fake engine speaks no SIP. Each UDP datagram, or each newline-terminated
line of a TCP connection (framed here, as the real engine frames), is a command:

    ECHO text           Send "text" back the way it came
    LOOKUP user         LookupAccount; answers "FOUND user" / "NONE" / "UNAVAILABLE"
    ALLOC               AllocateMedia; answers "ALLOCATED port" / "MEDIA-FAILED reason"
    RECORD              [CallRecord, Send "AFTER-RECORD"]: the send must wait for the write
    RELEASE ref         ReleaseMedia(ref)
    TIMER seconds       arm a deadline; when it fires: "FIRED <now - deadline>"
    CLOSE               CloseConnection of this TCP connection
    SLOW seconds        block the loop that long (to fill the input queue)
    BUG                 raise (the driver must log, count and go on)
    CALL / HANGUP       one more / one less active call
    TCPOUT port text    Send "text" over TCP to 127.0.0.1:port, no connection id
    UDPOUT port text    Send "text" over UDP to 127.0.0.1:port
"""

from __future__ import annotations

import threading
import time

from sansio_sip import (
    Account,
    Action,
    Address,
    AllocateMedia,
    CallRecord,
    CallRecordData,
    CloseConnection,
    Log,
    LookupAccount,
    MediaAllocation,
    MediaStats,
    MediaUnavailable,
    ReleaseMedia,
    Send,
    StoreUnavailable,
    Transport,
)


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.buffers: dict[int, bytes] = {}
        self.closed: list[int] = []
        self.deadline: float | None = None
        self.fired: list[tuple[float, float]] = []
        self.pending: dict[int, tuple[Address, Transport, int | None]] = {}
        self.next_token = 1
        self.active = 0
        self.accepting = True
        self.ended_all = False
        self.media_ended_calls: list[tuple[str, str]] = []
        self.failed: list[tuple[Address, Transport]] = []
        self.last_source: tuple[Address, Transport, int | None] | None = None
        self.lock = threading.Lock()

    # -- the driven API ----------------------------------------------------------------------

    def receive(
        self,
        data: bytes,
        *,
        source: Address,
        transport: Transport,
        now: float,
        wall: float,
        connection: int | None = None,
    ) -> list[Action]:
        self.calls.append(("receive", (data, source, transport, connection)))
        if transport is Transport.UDP:
            return self._command(data, source, transport, None, now)
        buffered = self.buffers.get(connection or 0, b"") + data
        *lines, rest = buffered.split(b"\n")
        self.buffers[connection or 0] = rest
        actions: list[Action] = []
        for line in lines:
            actions += self._command(line, source, transport, connection, now)
        return actions

    def connection_closed(self, connection: int, *, now: float, wall: float) -> list[Action]:
        self.closed.append(connection)
        self.buffers.pop(connection, None)
        return []

    def handle_timer(self, *, now: float, wall: float) -> list[Action]:
        if self.deadline is None or now < self.deadline or self.last_source is None:
            return []
        self.fired.append((now, self.deadline))
        late = now - self.deadline
        self.deadline = None
        return [self._reply(b"FIRED %f" % late, self.last_source)]

    def next_timer(self) -> float | None:
        return self.deadline

    def account_found(
        self, token: int, account: Account | None, *, now: float, wall: float
    ) -> list[Action]:
        origin = self.pending.pop(token)
        text = b"NONE" if account is None else b"FOUND " + account.username.encode()
        return [self._reply(text, origin)]

    def account_unavailable(self, token: int, *, now: float, wall: float) -> list[Action]:
        return [self._reply(b"UNAVAILABLE", self.pending.pop(token))]

    def media_allocated(
        self, token: int, allocation: MediaAllocation, *, now: float, wall: float
    ) -> list[Action]:
        return [self._reply(b"ALLOCATED %d" % allocation.a_port, self.pending.pop(token))]

    def media_failed(self, token: int, reason: str, *, now: float, wall: float) -> list[Action]:
        return [self._reply(b"MEDIA-FAILED " + reason.encode(), self.pending.pop(token))]

    def media_ended(self, call_ref: str, reason: str, *, now: float, wall: float) -> list[Action]:
        self.media_ended_calls.append((call_ref, reason))
        return []

    def transport_failed(
        self, destination: Address, transport: Transport, *, now: float, wall: float
    ) -> list[Action]:
        self.failed.append((destination, transport))
        if self.last_source is None:
            return []
        return [self._reply(b"FAILED %d" % destination[1], self.last_source)]

    def stop_accepting(self, *, now: float, wall: float) -> list[Action]:
        self.accepting = False
        return [Log(level="info", event="fake.stop_accepting")]

    def end_all_calls(self, *, now: float, wall: float) -> list[Action]:
        self.ended_all = True
        self.active = 0
        return []

    @property
    def active_calls(self) -> int:
        return self.active

    @property
    def idle(self) -> bool:
        return True

    # -- commands ----------------------------------------------------------------------------

    def _reply(self, text: bytes, origin: tuple[Address, Transport, int | None]) -> Send:
        source, transport, connection = origin
        if transport is Transport.TCP:
            text += b"\n"
        return Send(data=text, destination=source, transport=transport, connection=connection)

    def _command(
        self,
        line: bytes,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
    ) -> list[Action]:
        origin = (source, transport, connection)
        self.last_source = origin
        verb, _, rest = line.strip().partition(b" ")
        if verb == b"ECHO":
            return [self._reply(rest, origin)]
        if verb == b"LOOKUP":
            token = self._token(origin)
            return [LookupAccount(token=token, username=rest.decode())]
        if verb == b"ALLOC":
            token = self._token(origin)
            return [AllocateMedia(token=token, call_ref="call-1", a_peer=source)]
        if verb == b"RECORD":
            return [
                CallRecord(record=make_record(rest.decode() or "call-1")),
                self._reply(b"AFTER-RECORD", origin),
            ]
        if verb == b"RELEASE":
            return [ReleaseMedia(call_ref=rest.decode())]
        if verb == b"TIMER":
            self.deadline = now + float(rest)
            return []
        if verb == b"CLOSE" and connection is not None:
            return [CloseConnection(connection=connection, reason="asked to")]
        if verb == b"SLOW":
            time.sleep(float(rest))
            return []
        if verb == b"BUG":
            raise RuntimeError("fake engine bug")
        if verb == b"CALL":
            self.active += 1
            return [self._reply(b"CALLS %d" % self.active, origin)]
        if verb == b"HANGUP":
            self.active -= 1
            return [self._reply(b"CALLS %d" % self.active, origin)]
        if verb in (b"TCPOUT", b"UDPOUT"):
            port, _, text = rest.partition(b" ")
            out = Transport.TCP if verb == b"TCPOUT" else Transport.UDP
            return [Send(data=text + b"\n", destination=("127.0.0.1", int(port)), transport=out)]
        return [
            Log(
                level="debug",
                event="fake.unknown",
                fields=(("line", line.decode(errors="replace")),),
            )
        ]

    def _token(self, origin: tuple[Address, Transport, int | None]) -> int:
        token = self.next_token
        self.next_token += 1
        self.pending[token] = origin
        return token


def make_record(call_ref: str) -> CallRecordData:
    return CallRecordData(
        call_ref=call_ref,
        account="alice",
        a_call_id="a@b",
        b_call_id=None,
        source="127.0.0.1:5062",
        transport="UDP",
        user_agent="test",
        dialed="123",
        sent_digits=None,
        route=None,
        start_wall=1.0,
    )


class FakeStore:
    """A thread-safe store double: ``unavailable`` makes every call fail, ``delay`` slows it,
    ``write_failures`` fails that many record writes before taking one."""

    def __init__(self) -> None:
        self.accounts = {"alice": Account(username="alice", ha1={"MD5": "0" * 32})}
        self.unavailable = False
        self.delay = 0.0
        self.write_failures = 0
        self.records: list[tuple[float, CallRecordData]] = []
        self.stats: list[tuple[str, MediaStats | None, MediaStats | None]] = []
        self.lock = threading.Lock()

    def get_account(self, username: str) -> Account | None:
        if self.delay:
            time.sleep(self.delay)
        if self.unavailable:
            raise StoreUnavailable("down for the test")
        return self.accounts.get(username)

    def write_call_record(self, record: CallRecordData) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.write_failures > 0:
                self.write_failures -= 1
                raise StoreUnavailable("write failed for the test")
            self.records.append((time.monotonic(), record))

    def attach_media_stats(
        self, call_ref: str, a_leg: MediaStats | None, b_leg: MediaStats | None
    ) -> None:
        with self.lock:
            self.stats.append((call_ref, a_leg, b_leg))


class FakeRelay:
    def __init__(self) -> None:
        self.unavailable = False
        self.ended: list[tuple[str, str]] = []
        self.released: list[str] = []
        self.lock = threading.Lock()

    def allocate(self, call_ref: str, *, a_peer: Address | None, echo: bool) -> MediaAllocation:
        if self.unavailable:
            raise MediaUnavailable("ports exhausted")
        return MediaAllocation(
            call_ref=call_ref,
            a_address="127.0.0.1",
            a_port=20000,
            b_address="127.0.0.1",
            b_port=20002,
        )

    def update(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None = None,
        b_events: int | None = None,
    ) -> None:
        return None

    def release(self, call_ref: str) -> tuple[MediaStats | None, MediaStats | None]:
        self.released.append(call_ref)
        return MediaStats(packets_in=5), MediaStats(packets_in=7)

    def expired(self) -> list[tuple[str, str]]:
        with self.lock:
            ended, self.ended = self.ended, []
        return ended
