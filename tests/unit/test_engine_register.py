"""Engine behaviour of the guide's §6.1, §8 and §9 that needs no call, on a virtual clock."""

from __future__ import annotations

from engine_harness import CLIENT, REALM, Harness, Phone, account, parsed, statuses

from sansio_sip._digest import parse_challenge
from sansio_sip._message import Response, parse_message
from sansio_sip._model import Transport


def _register(h: Harness, phone: Phone, *, password: str | None = None,
              extra: tuple[tuple[str, str], ...] = (("Expires", "300"),)) -> Response:
    first = phone.request("REGISTER", extra=extra)
    challenge = parsed(h.receive(first))[-1]
    assert isinstance(challenge, Response) and challenge.status_code == 401
    phone.cseq += 1
    second = phone.authorize(phone.request("REGISTER", extra=extra), challenge, password=password)
    answer = parsed(h.receive(second))[-1]
    assert isinstance(answer, Response)
    return answer


def test_register_is_challenged_exactly_as_the_guide_says() -> None:
    h = Harness.make(account())
    [response] = parsed(h.receive(Phone().request("REGISTER")))
    assert isinstance(response, Response)
    assert (response.status_code, response.reason) == (401, "Unauthorized")
    value = response.headers.get("WWW-Authenticate") or ""
    assert value.startswith(f'Digest realm="{REALM}", nonce="')
    assert "algorithm=MD5" in value and 'qop="auth"' in value
    assert response.to.tag  # §8.2.6.2
    assert parse_challenge(value).stale is False


def test_register_with_good_credentials_gets_200_echoing_contact_with_expires() -> None:
    h = Harness.make(account())
    answer = _register(h, Phone())
    assert (answer.status_code, answer.reason) == (200, "OK")
    contact = answer.headers.get("Contact") or ""
    assert contact.startswith("<sip:acme@10.0.0.7:5060;transport=udp>")
    assert "expires=300" in contact
    assert answer.headers.get("Date")
    assert h.engine.stats()["transactions"] >= 1


def test_register_grants_at_most_the_configured_expiry_and_honours_contact_expires() -> None:
    h = Harness.make(account())
    phone = Phone()
    first = phone.request("REGISTER", extra=())
    first.headers.set("Contact", "<sip:acme@10.0.0.7:5060>;expires=3600")
    challenge = parsed(h.receive(first))[-1]
    assert isinstance(challenge, Response)
    second = phone.request("REGISTER", extra=())
    second.headers.set("Contact", "<sip:acme@10.0.0.7:5060>;expires=3600")
    answer = parsed(h.receive(phone.authorize(second, challenge)))[-1]
    assert isinstance(answer, Response) and answer.status_code == 200
    assert "expires=300" in (answer.headers.get("Contact") or "")


def test_unregister_is_answered_200_without_contacts() -> None:
    h = Harness.make(account())
    answer = _register(h, Phone(), extra=(("Expires", "0"),))
    assert answer.status_code == 200
    assert answer.headers.get("Contact") is None


def test_linphone_instance_and_reg_id_are_echoed() -> None:
    h = Harness.make(account())
    phone = Phone()
    contact = '<sip:acme@10.0.0.7:5060;transport=udp>;+sip.instance="<urn:uuid:0001>";reg-id=1'
    first = phone.request("REGISTER")
    first.headers.set("Contact", contact)
    challenge = parsed(h.receive(first))[-1]
    second = phone.request("REGISTER")
    second.headers.set("Contact", contact)
    assert isinstance(challenge, Response)
    answer = parsed(h.receive(phone.authorize(second, challenge)))[-1]
    assert isinstance(answer, Response) and answer.status_code == 200
    echoed = answer.headers.get("Contact") or ""
    assert '+sip.instance="<urn:uuid:0001>"' in echoed and "reg-id=1" in echoed


def test_unknown_and_suspended_users_get_403_unknown_user() -> None:
    h = Harness.make(account(), account("sleepy", active=False))
    answer = _register(h, Phone(username="nobody"))
    assert (answer.status_code, answer.reason) == (403, "Unknown user")
    answer = _register(h, Phone(username="sleepy", call_id="other@x"))
    assert (answer.status_code, answer.reason) == (403, "Unknown user")


def test_wrong_password_gets_403_bad_credentials() -> None:
    h = Harness.make(account())
    answer = _register(h, Phone(), password="wrong")
    assert (answer.status_code, answer.reason) == (403, "Bad credentials")


def test_wrong_realm_gets_403_bad_credentials() -> None:
    h = Harness.make(account())
    phone = Phone()
    request = phone.request("REGISTER")
    request.headers.add(
        "Authorization",
        'Digest username="acme", realm="other.example", nonce="abc", uri="sip:sip.kx21.com", '
        'response="00000000000000000000000000000000"',
    )
    [answer] = parsed(h.receive(request))
    assert isinstance(answer, Response)
    assert (answer.status_code, answer.reason) == (403, "Bad credentials")


def test_uniform_auth_failures_hide_which_usernames_exist() -> None:
    h = Harness.make(account(), uniform_auth_failures=True)
    unknown = _register(h, Phone(username="nobody"))
    wrong = _register(h, Phone(call_id="x2@y"), password="wrong")
    assert (unknown.status_code, unknown.reason) == (wrong.status_code, wrong.reason) == (
        403, "Forbidden")


def test_expired_nonce_is_answered_stale_true() -> None:
    h = Harness.make(account())
    phone = Phone()
    challenge = parsed(h.receive(phone.request("REGISTER")))[-1]
    assert isinstance(challenge, Response)
    h.advance(h.engine.config.nonce_lifetime + 5)
    phone.cseq += 1
    answer = parsed(h.receive(phone.authorize(phone.request("REGISTER"), challenge)))[-1]
    assert isinstance(answer, Response)
    assert answer.status_code == 401
    assert parse_challenge(answer.headers.get("WWW-Authenticate") or "").stale is True


def test_register_nonce_may_be_reused_with_growing_nonce_count() -> None:
    # Linphone re-REGISTERs with the last nonce and nc+1 (REGISTER is not single-use).
    h = Harness.make(account())
    phone = Phone()
    challenge = parsed(h.receive(phone.request("REGISTER")))[-1]
    assert isinstance(challenge, Response)
    for nc in (1, 2, 3):
        phone.cseq += 1
        answer = parsed(h.receive(phone.authorize(phone.request("REGISTER"), challenge, nc=nc)))
        assert statuses(h.sent[-1:]) == [200]
        assert isinstance(answer[-1], Response)


def test_options_needs_no_auth_and_lists_allow_accept_supported() -> None:
    h = Harness.make()
    [answer] = parsed(h.receive(Phone().request("OPTIONS")))
    assert isinstance(answer, Response) and answer.status_code == 200
    assert answer.headers.get("Allow") == "REGISTER, OPTIONS, INVITE, ACK, BYE, CANCEL"
    assert answer.headers.get("Accept") == "application/sdp"
    assert "Supported" in answer.headers


def test_other_methods_get_405_with_allow() -> None:
    h = Harness.make()
    for method in ("SUBSCRIBE", "MESSAGE", "INFO", "PUBLISH", "REFER", "UPDATE", "PRACK", "FOO"):
        [answer] = parsed(h.receive(Phone(call_id=f"{method}@x").request(method)))
        assert isinstance(answer, Response)
        assert (answer.status_code, answer.reason) == (405, "Method Not Allowed")
        assert answer.headers.get("Allow") == "REGISTER, OPTIONS, INVITE, ACK, BYE, CANCEL"


def test_malformed_request_gets_400_naming_the_fault() -> None:
    h = Harness.make()
    data = bytes(Phone().request("OPTIONS")).replace(b"CSeq: 1 OPTIONS", b"CSeq: one OPTIONS")
    [send] = h.receive(data)
    # The answer echoes the client's (broken) CSeq as received, so read it raw.
    status_line = send.data.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"SIP/2.0 400 ") and b"CSeq" in status_line
    assert b"\r\nCall-ID: c1d2e3f4@10.0.0.7\r\n" in send.data
    assert send.destination == CLIENT


def test_wrong_sip_version_gets_505() -> None:
    h = Harness.make()
    data = bytes(Phone().request("OPTIONS")).replace(b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1)
    [send] = h.receive(data)
    answer = parse_message(send.data)
    assert isinstance(answer, Response) and answer.status_code == 505


def test_garbage_and_responses_nobody_asked_for_are_dropped_and_counted() -> None:
    h = Harness.make()
    assert h.receive(b"\x00\xff garbage \r\n\r\n") == []
    assert h.receive(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKx\r\n\r\n") == []
    stats = h.engine.stats()
    assert stats.get("dropped_malformed", 0) + stats.get("dropped_stray_response", 0) == 2


def test_udp_keepalive_is_silently_ignored() -> None:
    h = Harness.make()
    assert h.receive(b"\r\n\r\n") == []
    assert h.engine.stats()["keepalives"] == 1


def test_responses_follow_received_and_rport() -> None:
    h = Harness.make()
    [send] = h.receive(Phone().request("OPTIONS"), source=("198.51.100.99", 61000))
    answer = parse_message(send.data)
    assert send.destination == ("198.51.100.99", 61000)
    assert isinstance(answer, Response)
    via = answer.top_via
    assert via.received == "198.51.100.99" and via.rport == 61000


def test_retransmitted_register_is_answered_from_the_transaction() -> None:
    h = Harness.make(account())
    request = Phone().request("REGISTER")
    first = h.receive(request)
    again = h.receive(request)
    assert [s.data for s in again] == [s.data for s in first]
    assert h.engine.stats()["retransmissions_absorbed"] == 1


def test_store_unavailable_gets_503_with_retry_after_then_recovers() -> None:
    h = Harness.make(account())
    h.store_up = False
    phone = Phone()
    answer = _register(h, phone)
    assert (answer.status_code, answer.headers.get("Retry-After")) == (503, "5")
    h.store_up = True
    phone.call_id = "second@x"
    assert _register(h, phone).status_code == 200


def test_out_of_dialog_bye_gets_481() -> None:
    h = Harness.make()
    assert statuses(h.receive(Phone().request("BYE", "sip:x@y"))) == [481]


def test_unknown_uri_scheme_gets_416_and_unknown_require_gets_420() -> None:
    h = Harness.make()
    request = Phone().request("OPTIONS", "nobodyKnowsThisScheme:x")
    assert statuses(h.receive(request)) == [416]
    request = Phone(call_id="z@z").request("OPTIONS", extra=(("Require", "nothing-known"),))
    [send] = h.receive(request)
    answer = parse_message(send.data)
    assert isinstance(answer, Response) and answer.status_code == 420
    assert answer.headers.get("Unsupported") == "nothing-known"


def test_tcp_stream_is_framed_and_keepalive_ping_gets_pong() -> None:
    h = Harness.make()
    data = bytes(Phone(transport="TCP").request("OPTIONS"))
    sends = h.receive(b"\r\n\r\n" + data[:10], transport=Transport.TCP, connection=3)
    assert [s.data for s in sends] == [b"\r\n"]
    sends = h.receive(data[10:], transport=Transport.TCP, connection=3)
    assert [s.connection for s in sends] == [3]
    assert statuses(sends) == [200]


def test_each_transaction_outcome_is_one_log_line_with_the_account() -> None:
    h = Harness.make(account())
    _register(h, Phone(), password="wrong")
    answered = [log.as_dict() for log in h.logs if log.event == "transaction.answered"]
    assert [(a["method"], a["status"], a["account"]) for a in answered] == [
        ("REGISTER", 401, None),
        ("REGISTER", 403, "acme"),
    ]
    assert answered[-1]["source"] == "198.51.100.7:40000"
    assert answered[-1]["call_id"] == "c1d2e3f4@10.0.0.7"


def test_engine_is_idle_once_answers_only_linger_for_retransmissions() -> None:
    h = Harness.make(account())
    assert h.engine.idle
    _register(h, Phone())
    assert h.engine.stats()["transactions"] > 0  # Timer J keeps them absorbing
    assert h.engine.idle


def test_invented_methods_do_not_grow_the_counters() -> None:
    h = Harness.make()
    for i in range(200):
        h.receive(Phone(call_id=f"m{i}@x").request(f"X{i}METHOD"))
    keys = [k for k in h.engine.stats() if k.startswith("requests_in.")]
    assert keys == ["requests_in.other"]
    assert h.engine.stats()["requests_in.other"] == 200
