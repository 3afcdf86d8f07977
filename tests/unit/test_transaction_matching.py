"""Matching (§17.1.3, §17.2.3, §9.2), the Via stamp (§18.2.1, RFC 3581 §4), the
response destination (§18.2.2) and the layer's bounds."""

from __future__ import annotations

import pytest
from transaction_support import CARRIER, CLIENT, TESTDATA, request, response_to

from sansio_sip._errors import LocalProtocolError, RemoteProtocolError
from sansio_sip._headers import parse_via
from sansio_sip._message import Request, Response, make_response, parse_message
from sansio_sip._model import Transport
from sansio_sip._transaction import TransactionLayer, TransactionState, response_destination

UDP, TCP = Transport.UDP, Transport.TCP


def top_via_text(req: Request) -> str:
    return req.headers.get_all("Via")[0]


# ----------------------------------------------------------------- stamp_via


def test_stamp_via_rfc3581_example() -> None:
    # RFC 3581 §6: the client at 10.1.1.1:4540 behind a NAT that maps it to 192.0.2.1:9988.
    req = request(via="SIP/2.0/UDP 10.1.1.1:4540;rport;branch=z9hG4bKkjshdyff")
    TransactionLayer(force_rport=False).stamp_via(req, ("192.0.2.1", 9988))
    assert top_via_text(req) == (
        "SIP/2.0/UDP 10.1.1.1:4540;received=192.0.2.1;rport=9988;branch=z9hG4bKkjshdyff"
    )
    assert response_destination(req.top_via, ("192.0.2.1", 9988), UDP) == ("192.0.2.1", 9988)


def test_stamp_via_rfc3261_received_for_domain_sent_by() -> None:
    # §18.2.1: a domain name in sent-by always gets received=.
    req = request(via="SIP/2.0/UDP bobspc.biloxi.com:5060;branch=z9hG4bKnashds7")
    TransactionLayer(force_rport=False).stamp_via(req, ("192.0.2.4", 5060))
    assert (
        top_via_text(req)
        == "SIP/2.0/UDP bobspc.biloxi.com:5060;branch=z9hG4bKnashds7;received=192.0.2.4"
    )


def test_stamp_via_leaves_matching_ip_alone_without_rport() -> None:
    req = request(via="SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK-x")
    before = list(req.headers)
    TransactionLayer(force_rport=False).stamp_via(req, CLIENT)
    assert list(req.headers) == before
    # Without rport the response goes to the sent-by port, not the source port.
    assert response_destination(req.top_via, ("192.0.2.10", 40000), UDP) == CLIENT


def test_stamp_via_replaces_a_received_the_peer_wrote() -> None:
    # Otherwise a peer could aim our responses at a third party.
    req = request(via="SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK-x;received=203.0.113.66")
    layer = TransactionLayer(force_rport=False)
    layer.stamp_via(req, CLIENT)
    assert req.top_via.received == CLIENT[0]
    txn = layer.create_server(req, source=CLIENT, transport=UDP, connection=None, now=0)
    assert txn.response_destination == CLIENT


def test_stamp_via_compares_ip_values_not_text() -> None:
    req = request(via="SIP/2.0/UDP [2001:db8:0::1]:5060;branch=z9hG4bK-v6")
    TransactionLayer(force_rport=False).stamp_via(req, ("2001:db8::1", 5060))
    assert req.top_via.received is None
    TransactionLayer(force_rport=False).stamp_via(req, ("2001:db8::2", 5060))
    assert req.top_via.received == "2001:db8::2"


def test_stamp_via_force_rport_acts_as_if_rport_was_sent() -> None:
    # Default: softphones behind NAT (DESIGN §2 layer 6) are answered at the source.
    req = request(via="SIP/2.0/UDP 192.168.1.2:5065;branch=z9hG4bK-nat")
    TransactionLayer().stamp_via(req, ("203.0.113.5", 61000))
    assert top_via_text(req) == (
        "SIP/2.0/UDP 192.168.1.2:5065;branch=z9hG4bK-nat;received=203.0.113.5;rport=61000"
    )
    # RFC 3581 §4: received is added even when the IP is the same.
    same = request(via="SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK-same")
    TransactionLayer().stamp_via(same, CLIENT)
    assert (same.top_via.received, same.top_via.rport) == ("192.0.2.10", 5070)


def test_stamp_via_overwrites_stale_values_in_place() -> None:
    # X-Lite 1006e writes ";rport;received=" after the branch (shared testdata).
    message = parse_message(
        (TESTDATA / "softphones" / "xlite-1006e-register-expires0.sip").read_bytes()
    )
    assert isinstance(message, Request)
    TransactionLayer(force_rport=False).stamp_via(message, ("89.100.104.192", 10254))
    assert top_via_text(message) == (
        "SIP/2.0/UDP 192.168.1.32:10254;branch=z9hG4bK-d87543-eb7c9f44883c5955-1--d87543-"
        ";rport=10254;received=89.100.104.192"
    )


def test_stamp_via_microsip_behind_nat() -> None:
    data = (TESTDATA / "softphones" / "microsip-3.19.22-invite.sip").read_bytes()
    # The capture's Content-Length exceeds its body (see the README); only the
    # header block matters here.
    head = data.split(b"\r\n\r\n", 1)[0].replace(b"Content-Length: 343", b"Content-Length: 0")
    message = parse_message(head + b"\r\n\r\n")
    assert isinstance(message, Request)
    layer = TransactionLayer(force_rport=False)
    layer.stamp_via(message, ("198.51.100.20", 1024))
    via = message.top_via
    assert (via.received, via.rport, via.host, via.port) == (
        "198.51.100.20",
        1024,
        "192.168.11.50",
        60163,
    )
    txn = layer.create_server(
        message, source=("198.51.100.20", 1024), transport=UDP, connection=None, now=0
    )
    assert txn.response_destination == ("198.51.100.20", 1024)


def test_stamp_via_changes_only_the_first_value_and_keeps_field_order() -> None:
    req = request(
        via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-a, SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK-b",
        more_vias=["SIP/2.0/TCP 10.0.0.8;branch=z9hG4bK-c"],
    )
    TransactionLayer().stamp_via(req, ("192.0.2.1", 7000))
    names = [name for name, _ in req.headers]
    assert names[:3] == ["Via", "Via", "Max-Forwards"]
    assert [str(v) for v in req.vias] == [
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-a;received=192.0.2.1;rport=7000",
        "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK-b",
        "SIP/2.0/TCP 10.0.0.8;branch=z9hG4bK-c",
    ]


def test_stamp_via_compact_form() -> None:
    raw = (
        b"OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-compact\r\n"
        b"f: <sip:x@y>;tag=1\r\nt: <sip:a@b>\r\ni: c\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n"
    )
    req = parse_message(raw)
    assert isinstance(req, Request)
    TransactionLayer().stamp_via(req, ("192.0.2.1", 7000))
    assert req.top_via.rport == 7000
    assert next(name for name, _ in req.headers) == "v"


# ----------------------------------------------------------------- response_destination


@pytest.mark.parametrize(
    ("via", "transport", "expected"),
    [
        # reliable: back over the connection, whatever the Via says (§18.2.2)
        ("SIP/2.0/TCP 10.0.0.1:5080;branch=z9hG4bK-1;received=1.2.3.4", TCP, CLIENT),
        # maddr wins on unreliable transports, port from sent-by or 5060
        ("SIP/2.0/UDP 10.0.0.1:5080;maddr=239.1.1.1;branch=z9hG4bK-1", UDP, ("239.1.1.1", 5080)),
        ("SIP/2.0/UDP 10.0.0.1;maddr=239.1.1.1;rport=9;received=1.2.3.4", UDP, ("239.1.1.1", 5060)),
        # received + rport (RFC 3581 §4)
        ("SIP/2.0/UDP 10.0.0.1:5080;received=1.2.3.4;rport=9999", UDP, ("1.2.3.4", 9999)),
        # received without rport: the sent-by port (or 5060)
        ("SIP/2.0/UDP 10.0.0.1:5080;received=1.2.3.4", UDP, ("1.2.3.4", 5080)),
        ("SIP/2.0/UDP host.example.com;received=1.2.3.4", UDP, ("1.2.3.4", 5060)),
        # nothing stamped: the sent-by itself
        ("SIP/2.0/UDP 10.0.0.1:5080;branch=z9hG4bK-1", UDP, ("10.0.0.1", 5080)),
        ("SIP/2.0/UDP [2001:db8::5];branch=z9hG4bK-1", UDP, ("2001:db8::5", 5060)),
        # a port no socket can send to falls back to the source port
        ("SIP/2.0/UDP 10.0.0.1:0;branch=z9hG4bK-1", UDP, ("10.0.0.1", CLIENT[1])),
        ("SIP/2.0/UDP 10.0.0.1;received=1.2.3.4;rport=0", UDP, ("1.2.3.4", CLIENT[1])),
    ],
)
def test_response_destination(via: str, transport: Transport, expected: tuple[str, int]) -> None:
    assert response_destination(parse_via(via), CLIENT, transport) == expected


# ----------------------------------------------------------------- server matching


@pytest.fixture
def layer() -> TransactionLayer:
    return TransactionLayer()


def incoming(layer: TransactionLayer, req: Request, source: tuple[str, int] = CLIENT) -> Request:
    layer.stamp_via(req, source)
    return req


def test_match_server_by_branch_sent_by_and_method(layer: TransactionLayer) -> None:
    txn = layer.create_server(
        incoming(layer, request()), source=CLIENT, transport=UDP, connection=None, now=0
    )
    assert layer.match_server(incoming(layer, request())) is txn
    # Another source port changes rport/received but not sent-by: still a match.
    assert layer.match_server(incoming(layer, request(), ("192.0.2.99", 1))) is txn
    assert layer.match_server(incoming(layer, request(branch="z9hG4bK-other"))) is None
    assert layer.match_server(incoming(layer, request(sent_by="192.0.2.11:5070"))) is None
    assert layer.match_server(incoming(layer, request(sent_by="192.0.2.10:5071"))) is None
    # The same branch with another method is another transaction (CANCEL, §9.2).
    assert layer.match_server(incoming(layer, request("CANCEL"))) is None
    # Default port: "192.0.2.10" and "192.0.2.10:5060" are the same sent-by.
    bare = layer.create_server(
        incoming(layer, request(branch="z9hG4bK-bare", sent_by="192.0.2.10")),
        source=CLIENT,
        transport=UDP,
        connection=None,
        now=0,
    )
    assert (
        layer.match_server(
            incoming(layer, request(branch="z9hG4bK-bare", sent_by="192.0.2.10:5060"))
        )
        is bare
    )


def test_ack_matches_invite_only_for_non_2xx(layer: TransactionLayer) -> None:
    txn = layer.create_server(
        incoming(layer, request()), source=CLIENT, transport=UDP, connection=None, now=0
    )
    ack = incoming(layer, request("ACK", to_tag="x"))
    assert layer.match_server(ack) is txn  # before a final response: absorbed by the machine
    assert layer.receive_retransmission(txn, ack, now=0.1) == []
    assert txn.state is TransactionState.PROCEEDING
    layer.respond(txn, make_response(txn.request, 486, "Busy", to_tag="x"), now=0.2)
    assert layer.match_server(ack) is txn

    ok_txn = layer.create_server(
        incoming(layer, request(branch="z9hG4bK-ok")),
        source=CLIENT,
        transport=UDP,
        connection=None,
        now=0,
    )
    layer.respond(ok_txn, make_response(ok_txn.request, 200, "OK", to_tag="y"), now=0.2)
    assert (
        layer.match_server(incoming(layer, request("ACK", branch="z9hG4bK-ok", to_tag="y"))) is None
    )


def test_cancel_has_its_own_transaction_and_finds_the_invite(layer: TransactionLayer) -> None:
    invite = layer.create_server(
        incoming(layer, request()), source=CLIENT, transport=UDP, connection=None, now=0
    )
    cancel = incoming(layer, request("CANCEL"))
    assert layer.match_server(cancel) is None
    assert layer.find_invite_for_cancel(cancel) is invite
    cancel_txn = layer.create_server(cancel, source=CLIENT, transport=UDP, connection=None, now=0)
    assert cancel_txn is not invite and len(layer) == 2
    assert layer.match_server(incoming(layer, request("CANCEL"))) is cancel_txn
    # §9.2: no INVITE with that branch → the TU answers 481.
    assert (
        layer.find_invite_for_cancel(incoming(layer, request("CANCEL", branch="z9hG4bK-zz")))
        is None
    )
    # A non-INVITE transaction with the branch is not a CANCEL target.
    options = layer.create_server(
        incoming(layer, request("OPTIONS", branch="z9hG4bK-opt")),
        source=CLIENT,
        transport=UDP,
        connection=None,
        now=0,
    )
    assert options is not None
    assert (
        layer.find_invite_for_cancel(incoming(layer, request("CANCEL", branch="z9hG4bK-opt")))
        is None
    )


def rfc2543(method: str = "INVITE", **kw: object) -> Request:
    """A request from an RFC 2543 client: no magic cookie in the branch."""
    kw.setdefault("branch", "1234")
    return request(method, **kw)  # type: ignore[arg-type]


def test_rfc2543_fallback_matching(layer: TransactionLayer) -> None:
    txn = layer.create_server(
        incoming(layer, rfc2543()), source=CLIENT, transport=UDP, connection=None, now=0
    )
    assert txn.key[0] == "2543"
    assert layer.match_server(incoming(layer, rfc2543())) is txn
    for different in (
        rfc2543(uri="sip:other@sip.kx21.com"),
        rfc2543(to_tag="unexpected"),
        rfc2543(from_tag="other"),
        rfc2543(call_id="other-call"),
        rfc2543(cseq=2),
        rfc2543(branch="5678"),
        rfc2543(sent_by="192.0.2.10:5071"),
    ):
        assert layer.match_server(incoming(layer, different)) is None
    # No branch at all works the same.
    bare = layer.create_server(
        incoming(layer, rfc2543(branch=None, call_id="bare")),
        source=CLIENT,
        transport=UDP,
        connection=None,
        now=0,
    )
    assert layer.match_server(incoming(layer, rfc2543(branch=None, call_id="bare"))) is bare


def test_rfc2543_ack_matches_by_the_final_responses_to_tag(layer: TransactionLayer) -> None:
    txn = layer.create_server(
        incoming(layer, rfc2543()), source=CLIENT, transport=UDP, connection=None, now=0
    )
    layer.respond(txn, make_response(txn.request, 100, "Trying"), now=0)
    layer.respond(txn, make_response(txn.request, 404, "Not Found", to_tag="t404"), now=0.1)
    assert layer.match_server(incoming(layer, rfc2543("ACK", to_tag="t404"))) is txn
    assert layer.match_server(incoming(layer, rfc2543("ACK", to_tag="wrong"))) is None
    assert layer.match_server(incoming(layer, rfc2543("ACK"))) is None
    # CANCEL in RFC 2543 matching: same To as the INVITE (no tag here).
    assert layer.find_invite_for_cancel(incoming(layer, rfc2543("CANCEL"))) is txn
    assert layer.find_invite_for_cancel(incoming(layer, rfc2543("CANCEL", to_tag="t404"))) is None


def test_rfc2543_ack_for_2xx_is_the_tus(layer: TransactionLayer) -> None:
    txn = layer.create_server(
        incoming(layer, rfc2543()), source=CLIENT, transport=UDP, connection=None, now=0
    )
    layer.respond(txn, make_response(txn.request, 200, "OK", to_tag="t200"), now=0.1)
    assert layer.match_server(incoming(layer, rfc2543("ACK", to_tag="t200"))) is None


def test_rfc4475_badbranch_uses_the_fallback(layer: TransactionLayer) -> None:
    # RFC 4475 §3.3.14: a branch that is only the magic cookie is not an RFC 3261 branch.
    data = (TESTDATA / "rfc4475" / "badbranch.dat").read_bytes()
    first, second = parse_message(data), parse_message(data)
    assert isinstance(first, Request) and isinstance(second, Request)
    txn = layer.create_server(
        incoming(layer, first), source=CLIENT, transport=UDP, connection=None, now=0
    )
    assert txn.key[0] == "2543"
    assert layer.match_server(incoming(layer, second)) is txn
    other = parse_message(data.replace(b"CSeq: 8", b"CSeq: 9"))
    assert isinstance(other, Request)
    assert layer.match_server(incoming(layer, other)) is None


# ----------------------------------------------------------------- client matching


def test_match_client_by_branch_and_cseq_method(layer: TransactionLayer) -> None:
    invite_req = request(sent_by="203.0.113.1:5060", branch="z9hG4bK-b1")
    invite, _ = layer.create_client(invite_req, destination=CARRIER, transport=UDP, now=0)
    cancel_req = request("CANCEL", sent_by="203.0.113.1:5060", branch="z9hG4bK-b1")
    cancel, _ = layer.create_client(cancel_req, destination=CARRIER, transport=UDP, now=0)
    assert layer.match_client(response_to(invite_req, 180)) is invite
    assert layer.match_client(response_to(cancel_req, 200)) is cancel
    assert layer.match_client(response_to(request(branch="z9hG4bK-b2"), 200)) is None
    # A response without a Via cannot match anything (a stray to drop).
    broken = Response(200, "OK", [("CSeq", "1 INVITE")])
    assert layer.match_client(broken) is None
    garbled = Response(200, "OK", [("Via", "garbage!!"), ("CSeq", "1 INVITE")])
    assert layer.match_client(garbled) is None


def test_create_client_refusals(layer: TransactionLayer) -> None:
    with pytest.raises(LocalProtocolError, match="z9hG4bK"):
        layer.create_client(request(branch="1234"), destination=CARRIER, transport=UDP, now=0)
    with pytest.raises(LocalProtocolError, match="z9hG4bK"):
        layer.create_client(request(branch="z9hG4bK"), destination=CARRIER, transport=UDP, now=0)
    with pytest.raises(LocalProtocolError, match="ACK"):
        layer.create_client(request("ACK"), destination=CARRIER, transport=UDP, now=0)
    layer.create_client(request(), destination=CARRIER, transport=UDP, now=0)
    with pytest.raises(LocalProtocolError, match="exists"):
        layer.create_client(request(), destination=CARRIER, transport=UDP, now=0)
    assert len(layer) == 1


def test_create_server_refusals(layer: TransactionLayer) -> None:
    with pytest.raises(LocalProtocolError, match="ACK"):
        layer.create_server(
            incoming(layer, request("ACK")), source=CLIENT, transport=UDP, connection=None, now=0
        )
    layer.create_server(
        incoming(layer, request()), source=CLIENT, transport=UDP, connection=None, now=0
    )
    with pytest.raises(LocalProtocolError, match="match_server"):
        layer.create_server(
            incoming(layer, request()), source=CLIENT, transport=UDP, connection=None, now=0
        )


# ----------------------------------------------------------------- bounds


def test_overload_bound_answers_503_with_retry_after() -> None:
    layer = TransactionLayer(max_transactions=3, retry_after=7)
    for n in range(3):
        layer.create_server(
            incoming(layer, request("OPTIONS", branch=f"z9hG4bK-{n}")),
            source=CLIENT,
            transport=UDP,
            connection=None,
            now=0,
        )
    with pytest.raises(RemoteProtocolError) as caught:
        layer.create_server(
            incoming(layer, request("OPTIONS", branch="z9hG4bK-3")),
            source=CLIENT,
            transport=UDP,
            connection=None,
            now=0,
        )
    assert caught.value.status_code == 503
    assert caught.value.reason == "Server overloaded"
    assert caught.value.headers == (("Retry-After", "7"),)
    assert len(layer) == 3
    # Retransmissions of live transactions are still absorbed under overload.
    assert layer.match_server(incoming(layer, request("OPTIONS", branch="z9hG4bK-0"))) is not None


def test_client_bound() -> None:
    layer = TransactionLayer(max_transactions=2)
    for n in range(2):
        layer.create_client(
            request("BYE", branch=f"z9hG4bK-{n}"), destination=CARRIER, transport=UDP, now=0
        )
    with pytest.raises(LocalProtocolError, match="Too many"):
        layer.create_client(
            request("BYE", branch="z9hG4bK-2"), destination=CARRIER, transport=UDP, now=0
        )


def test_terminated_transactions_leave_every_table() -> None:
    layer = TransactionLayer()
    for n in range(50):
        req = incoming(layer, request("OPTIONS", branch=f"z9hG4bK-s{n}"))
        txn = layer.create_server(req, source=CLIENT, transport=UDP, connection=None, now=0)
        layer.respond(txn, make_response(req, 200, "OK", to_tag="t"), now=0)
        client, _ = layer.create_client(
            request("BYE", branch=f"z9hG4bK-c{n}"), destination=CARRIER, transport=UDP, now=0
        )
        layer.receive_response(client, response_to(client.request, 200), now=0)
    assert len(layer) == 100
    layer.handle_timer(now=1000.0)
    assert len(layer) == 0 and layer.next_timer() is None
    # Internal tables hold nothing either (no slow leak through the peer index or heap).
    assert not layer._servers and not layer._clients and not layer._by_peer
    assert len(layer._timers) == 0


def test_at_the_bound_the_oldest_answered_transaction_makes_room() -> None:
    layer = TransactionLayer(max_transactions=3)  # T1 = 0.5 s: evictable after 2 s
    answered = []
    for n in range(3):
        req = incoming(layer, request("REGISTER", branch=f"z9hG4bK-r{n}"))
        txn = layer.create_server(req, source=CLIENT, transport=UDP, connection=None, now=n)
        if n < 2:
            layer.respond(txn, make_response(req, 200, "OK", to_tag="t"), now=n)
            answered.append(txn)
    assert [t.state for t in answered] == [TransactionState.COMPLETED] * 2
    newcomer = incoming(layer, request("REGISTER", branch="z9hG4bK-r3"))
    layer.create_server(newcomer, source=CLIENT, transport=UDP, connection=None, now=2.5)
    assert len(layer) == 3 and layer.evicted == 1
    # The oldest answered one went (its timers too); the younger still absorbs.
    assert answered[0].state is TransactionState.TERMINATED
    assert layer.deadlines(answered[0]) == {}
    assert layer.match_server(incoming(layer, request("REGISTER", branch="z9hG4bK-r0"))) is None
    assert (
        layer.match_server(incoming(layer, request("REGISTER", branch="z9hG4bK-r1"))) is answered[1]
    )
    # The other answered one has lingered less than 4*T1 (answered at 1, now 2.9): kept,
    # and the new request is refused.
    with pytest.raises(RemoteProtocolError):
        layer.create_server(
            incoming(layer, request("REGISTER", branch="z9hG4bK-r4")),
            source=CLIENT, transport=UDP, connection=None, now=2.9,
        )  # fmt: skip
    assert layer.evicted == 1 and answered[1].state is TransactionState.COMPLETED
    # Once it has lingered 4*T1 it makes room; then only transactions in flight are left.
    layer.create_server(
        incoming(layer, request("REGISTER", branch="z9hG4bK-r5")),
        source=CLIENT, transport=UDP, connection=None, now=3.0,
    )  # fmt: skip
    assert layer.evicted == 2
    with pytest.raises(RemoteProtocolError):
        layer.create_server(
            incoming(layer, request("REGISTER", branch="z9hG4bK-r6")),
            source=CLIENT, transport=UDP, connection=None, now=10,
        )  # fmt: skip
