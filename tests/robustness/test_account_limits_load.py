"""Per-account limits under load (issue #7 item 5): concurrent calls and calls per second.

A real ``kx-sipd serve`` on loopback, a carrier written here (a UDP UAS that
answers every INVITE 200 at once and keeps a count of the calls it has up),
and callers written here too: each offered call is one thread with its own
socket doing the guide's flow (INVITE, 401, ACK, INVITE with Authorization,
then 200/ACK/hold/BYE or a refusal and its ACK). Calls are offered well above
the account's limits for a few seconds; then:

* at the carrier, 200s sent minus BYEs received never exceed ``max_calls``;
  the server's own ``calls.up`` (``/status``, polled during the load) never
  does either; the call records, as intervals [start, end), never overlap
  more than ``max_calls`` deep;
* the admitted calls' start times (the records' ``start_wall``, stamped by the
  driver when the authenticated INVITE arrived, the instant the engine
  admitted it) never put more than ``max_cps`` + 1 in any 1 s window. The
  engine's window is half-open, ``(now - 1, now]``: two starts exactly 1.0 s
  apart are in different windows for it but in the same closed window here,
  and ``start_wall`` is read from another clock (wall) than the one the
  engine counts with (monotonic), a few microseconds apart; so one start on
  an edge may be counted twice, never more;
* every refused call got exactly ``403 Call limit reached`` (guide §6.3) and
  was recorded as such; every admitted call was answered, hung up by the
  client and recorded (final status 200, ended by the client);
* afterwards the account's counters are back to zero: a new call is admitted.

With two accounts, one driven past its limits must not cost the other a call.

Bounded: a fixed number of calls, every wait under a deadline, loopback only,
free ports, and every process and thread started here stopped here.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from math import inf
from pathlib import Path

import orjson
import pytest
from robust_support import (
    ACCOUNTS,
    REALM,
    KxServer,
    Response,
    authorization,
    free_port,
    make_database,
    parse_response,
)

from kx_sipd.store import Store
from sansio_sip import CallRecordData

pytestmark = [pytest.mark.interop]

T1 = 0.5
CALL_WAIT = 15.0  # longest a caller waits for any final answer (loaded host)
LIMIT_REASON = "Call limit reached"
SDP = (
    "v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
)


def _header(raw: str, name: str) -> list[str]:
    """Every value of a header (full name only: the server and we write full names)."""
    head = raw.split("\r\n\r\n", 1)[0]
    wanted = name.lower()
    return [
        line.partition(":")[2].strip()
        for line in head.split("\r\n")[1:]
        if line.partition(":")[0].strip().lower() == wanted
    ]


class Carrier(threading.Thread):
    """A UAS answering every INVITE 200 at once; counts the calls it has up."""

    def __init__(self, deadline: float) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", free_port()))
        self.address = self.sock.getsockname()
        self.deadline = deadline
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.answered: dict[str, bytes] = {}  # Call-ID -> the 200 sent (for retransmissions)
        self.ended: set[str] = set()
        self.up = 0
        self.max_up = 0
        self.unexpected: list[str] = []

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            text = data.decode("utf-8", "replace")
            method = text.split(" ", 1)[0]
            if method == "INVITE":
                self._invite(text, source)
            elif method == "BYE":
                self._bye(text, source)
            elif method != "ACK" and not text.startswith("SIP/2.0 "):
                self.unexpected.append(text.split("\r\n", 1)[0])

    def _reply(self, request: str, status: str, *, tag: str = "", extra: str = "",
               body: str = "") -> bytes:  # fmt: skip
        to = _header(request, "To")[0]
        if tag and ";tag=" not in to:
            to += f";tag={tag}"
        lines = [
            f"SIP/2.0 {status}",
            *(f"Via: {via}" for via in _header(request, "Via")),
            f"From: {_header(request, 'From')[0]}",
            f"To: {to}",
            f"Call-ID: {_header(request, 'Call-ID')[0]}",
            f"CSeq: {_header(request, 'CSeq')[0]}",
        ]
        if extra:
            lines.append(extra)
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    def _invite(self, request: str, source: tuple[str, int]) -> None:
        call_id = _header(request, "Call-ID")[0]
        with self.lock:
            answer = self.answered.get(call_id)
            if answer is None:
                host, port = self.address
                answer = self._reply(
                    request, "200 OK", tag=f"{random.getrandbits(32):08x}",
                    extra=f"Contact: <sip:carrier@{host}:{port}>\r\n"
                    "Content-Type: application/sdp",
                    body=SDP.format(port=40000).replace("0 8 101", "0 101"),
                )  # fmt: skip
                self.answered[call_id] = answer
                self.up += 1
                self.max_up = max(self.max_up, self.up)
        self.sock.sendto(answer, source)

    def _bye(self, request: str, source: tuple[str, int]) -> None:
        call_id = _header(request, "Call-ID")[0]
        with self.lock:
            if call_id in self.answered and call_id not in self.ended:
                self.ended.add(call_id)
                self.up -= 1
        self.sock.sendto(self._reply(request, "200 OK"), source)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.sock.close()


class Caller(threading.Thread):
    """One call of the guide's flow from a socket of its own; ``outcome`` is
    "answered" (200, held, hung up with a 200 to the BYE), "refused <code>
    <reason>", or what went wrong."""

    def __init__(self, server: tuple[str, int], user: str, password: str, hold: float) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.user, self.password = user, password
        self.hold = hold
        self.call_id = f"{random.getrandbits(64):016x}@limits"
        self.tag = f"{random.getrandbits(32):08x}"
        self.outcome = "not finished"

    def run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", 0))
            self.outcome = self._call(sock)
        except OSError as exc:
            self.outcome = f"socket error {exc}"
        finally:
            sock.close()

    def _request(self, sock: socket.socket, method: str, uri: str, cseq: int, branch: str,
                 to: str, extra: str = "", body: str = "") -> bytes:  # fmt: skip
        host, port = sock.getsockname()
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {host}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.user}@{REALM}>;tag={self.tag}",
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:{self.user}@{host}:{port}>",
        ]
        if extra:
            lines.append(extra)
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    def _transaction(self, sock: socket.socket, message: bytes, cseq: int) -> Response | None:
        """Send, retransmit (T1 doubling) until anything answers, return the final
        response to this CSeq (or None by CALL_WAIT)."""
        deadline = time.monotonic() + CALL_WAIT
        interval, heard = T1, False
        sock.sendto(message, self.server)
        next_send = time.monotonic() + interval
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, min(next_send, deadline) - time.monotonic()))
            try:
                data, _ = sock.recvfrom(65535)
            except TimeoutError:
                if not heard:
                    sock.sendto(message, self.server)
                    interval = min(interval * 2, 4.0)
                    next_send = time.monotonic() + interval
                continue
            response = parse_response(data)
            if response is None or not (response.header("CSeq") or "").startswith(f"{cseq} "):
                continue
            heard = True
            if response.status >= 200:
                return response
        return None

    def _call(self, sock: socket.socket) -> str:
        uri = f"sip:17752180264@{REALM}"
        to = f"<{uri}>"
        body = SDP.format(port=random.randrange(20000, 30000, 2))
        branch = f"z9hG4bK{random.getrandbits(48):012x}"
        first = self._transaction(
            sock, self._request(sock, "INVITE", uri, 1, branch, to, body=body), 1
        )
        if first is None or first.status not in (401, 407):
            return f"no challenge: {first and first.status}"
        sock.sendto(
            self._request(sock, "ACK", uri, 1, branch, first.header("To") or to), self.server
        )
        challenge = first.header("WWW-Authenticate") or first.header("Proxy-Authenticate") or ""
        nonce = challenge.split('nonce="', 1)[1].split('"', 1)[0]
        header = "Proxy-Authorization" if first.status == 407 else "Authorization"
        auth = authorization(self.user, self.password, "INVITE", uri, nonce)
        branch = f"z9hG4bK{random.getrandbits(48):012x}"
        invite = self._request(sock, "INVITE", uri, 2, branch, to, f"{header}: {auth}", body)
        final = self._transaction(sock, invite, 2)
        if final is None:
            return "no final answer"
        if final.status != 200:
            sock.sendto(
                self._request(sock, "ACK", uri, 2, branch, final.header("To") or to), self.server
            )
            return f"refused {final.status} {final.reason}"
        peer_to = final.header("To") or to
        contact = (final.header("Contact") or "").strip("<>").split(">", 1)[0]
        target = contact or uri
        ack_branch = f"z9hG4bK{random.getrandbits(48):012x}"
        sock.sendto(self._request(sock, "ACK", target, 2, ack_branch, peer_to), self.server)
        time.sleep(self.hold)
        bye_branch = f"z9hG4bK{random.getrandbits(48):012x}"
        bye = self._transaction(sock, self._request(sock, "BYE", target, 3, bye_branch, peer_to), 3)
        if bye is None or bye.status != 200:
            return f"BYE answered {bye and bye.status}"
        return "answered"


class StatusPoller(threading.Thread):
    """``calls.up`` from the control endpoint's /status, every 0.2 s."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.samples: list[int] = []

    def up(self) -> int | None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
            try:
                connection.request("GET", "/status")
                body = orjson.loads(connection.getresponse().read())
            finally:
                connection.close()
        except (OSError, http.client.HTTPException, orjson.JSONDecodeError):
            return None  # a loaded host: a missed sample, not a failure
        calls = body.get("calls")
        return int(calls["up"]) if isinstance(calls, dict) else None

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            value = self.up()
            if value is not None:
                self.samples.append(value)


def _offer(server: tuple[str, int], user: str, *, rate: float, seconds: float,
           hold: float) -> list[Caller]:  # fmt: skip
    """``rate`` calls per second for ``seconds``, each held ``hold`` s; waits for all."""
    callers: list[Caller] = []
    start = time.monotonic()
    for index in range(int(rate * seconds)):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        caller = Caller(server, user, ACCOUNTS[user], hold)
        caller.start()
        callers.append(caller)
    return callers


def _join(callers: list[Caller]) -> None:
    deadline = time.monotonic() + 3 * CALL_WAIT + 10
    for caller in callers:
        caller.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(caller.is_alive() for caller in callers), "a caller did not finish"


def _records(db: Path, call_ids: set[str], wait: float = 10.0) -> list[CallRecordData]:
    """The records of these calls, once all of them are closed (end_wall set)."""
    deadline = time.monotonic() + wait
    with Store(db, create=False) as store:
        while True:
            found = [
                entry.record
                for entry in store.list_calls(limit=None)
                if entry.record.a_call_id in call_ids
            ]
            closed = [record for record in found if record.end_wall is not None]
            if len(closed) == len(call_ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def _max_overlap(records: list[CallRecordData]) -> int:
    """Deepest overlap of the admitted calls' [start, end) intervals."""
    admitted = [r for r in records if r.final_status == 200]
    return max(
        (
            sum(
                1
                for other in admitted
                if other.start_wall <= r.start_wall < (other.end_wall or inf)
            )
            for r in admitted
        ),
        default=0,
    )


def _max_per_window(starts: list[float]) -> int:
    """Most starts in any closed window [t, t + 1 s] beginning at a start."""
    starts = sorted(starts)
    return max((sum(1 for s in starts if t <= s <= t + 1.0) for t in starts), default=0)


Limited = tuple[KxServer, Carrier, "StatusPoller", Path]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Limited]:
    """A server whose alice may have 4 calls up and start 2 per second, carol 3 and 2."""
    carrier = Carrier(deadline=time.monotonic() + 180)
    db = make_database(tmp_path / "kx.sqlite", carrier=carrier.address)
    with Store(db) as store:
        store.update_account("alice", max_calls=4, max_cps=2)
        store.update_account("carol", max_calls=3, max_cps=2)
    control = free_port()
    carrier.start()
    server = KxServer.start(tmp_path, "--metrics", f"127.0.0.1:{control}", db=db, ipv6=False)
    poller = StatusPoller(control)
    try:
        yield server, carrier, poller, db
    finally:
        poller.stopping.set()
        server.stop()
        carrier.stop()
        if poller.is_alive():
            poller.join(timeout=5)


def test_one_account_offered_far_above_both_limits(limited: Limited) -> None:
    server, carrier, poller, db = limited
    max_calls, max_cps = 4, 2
    poller.start()
    # 12 calls/s for 5 s, each held 2.5 s: six times the rate limit; and at the
    # 2/s the rate limit lets through, 5 calls would be up against a limit of 4.
    callers = _offer(server.address, "alice", rate=12.0, seconds=5.0, hold=2.5)
    _join(callers)
    poller.stopping.set()
    poller.join(timeout=5)

    outcomes = Counter(caller.outcome for caller in callers)
    answered = {c.call_id for c in callers if c.outcome == "answered"}
    refused = {c.call_id for c in callers if c.outcome.startswith("refused")}
    assert set(outcomes) <= {"answered", f"refused 403 {LIMIT_REASON}"}, outcomes
    assert len(answered) + len(refused) == len(callers) == 60
    assert answered and len(refused) > len(answered), outcomes

    # Concurrency, seen three ways.
    assert carrier.max_up <= max_calls, carrier.max_up
    assert carrier.max_up == max_calls, "the load should have reached the concurrent-call limit"
    assert carrier.up == 0 and not carrier.unexpected, (carrier.up, carrier.unexpected)
    assert poller.samples and max(poller.samples) <= max_calls, poller.samples
    records = _records(db, answered | refused)
    assert _max_overlap(records) <= max_calls

    # The rate: admissions per 1 s window (+1 for the edge, see the module docs).
    starts = [r.start_wall for r in records if r.final_status == 200]
    assert _max_per_window(starts) <= max_cps + 1, sorted(starts)

    # Every call recorded as it went.
    by_call = {r.a_call_id: r for r in records}
    assert set(by_call) == answered | refused
    for call_id in answered:
        record = by_call[call_id]
        assert (record.final_status, record.ended_by) == (200, "client"), record
        assert record.answer_wall is not None and record.end_wall is not None
    for call_id in refused:
        record = by_call[call_id]
        assert (record.final_status, record.ended_by, record.reason) == (
            403, "rejected", LIMIT_REASON,
        ), record  # fmt: skip

    print(
        f"offered {len(callers)}, answered {len(answered)}, refused {len(refused)}; "
        f"most up at the carrier {carrier.max_up}, in /status {max(poller.samples)}, "
        f"in the records {_max_overlap(records)}; most starts in 1 s {_max_per_window(starts)}"
    )

    # Counters back to zero: after a pause longer than the rate window, a new call goes through.
    time.sleep(1.1)
    assert poller.up() == 0
    after = _offer(server.address, "alice", rate=10.0, seconds=0.1, hold=0.2)
    _join(after)
    assert after[0].outcome == "answered"


def test_an_account_at_its_limit_does_not_affect_another(limited: Limited) -> None:
    server, carrier, poller, db = limited
    results: dict[str, list[Caller]] = {}

    def offer(user: str, rate: float, seconds: float, hold: float) -> None:
        results[user] = _offer(server.address, user, rate=rate, seconds=seconds, hold=hold)

    # alice far past hers (10/s against 2/s); carol at 1 call per second held
    # 1.5 s: at most 2 up and 1 per second, within her 3 and 2.
    threads = [
        threading.Thread(target=offer, args=("alice", 10.0, 4.0, 2.0), daemon=True),
        threading.Thread(target=offer, args=("carol", 1.0, 4.0, 1.5), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    _join(results["alice"] + results["carol"])

    alice = Counter(caller.outcome for caller in results["alice"])
    carol = Counter(caller.outcome for caller in results["carol"])
    assert carol == {"answered": 4}, carol
    assert set(alice) == {"answered", f"refused 403 {LIMIT_REASON}"}, alice
    assert alice[f"refused 403 {LIMIT_REASON}"] > alice["answered"], alice
    call_ids = {c.call_id for c in results["alice"] + results["carol"]}
    records = _records(db, call_ids)
    alice_records = [r for r in records if r.account == "alice"]
    carol_records = [r for r in records if r.account == "carol"]
    assert len(alice_records) == 40 and len(carol_records) == 4
    assert all(r.final_status == 200 and r.ended_by == "client" for r in carol_records)
    assert _max_overlap(alice_records) <= 4
    assert _max_per_window([r.start_wall for r in alice_records if r.final_status == 200]) <= 3
    assert carrier.up == 0
    print(f"alice {dict(alice)}, carol {dict(carol)}")
