"""The engine counts each response it sends by the request's method and the
status code (the kx_sipd_sip_answers_total series), with unknown methods and
unparseable requests in bounded buckets."""

from __future__ import annotations

from engine_harness import Harness, Phone, statuses


def answered(h: Harness) -> dict[str, int]:
    return {k: v for k, v in h.engine.stats().items() if k.startswith("answered.")}


def test_answers_are_counted_by_method_and_code() -> None:
    h = Harness.make()
    phone = Phone()
    assert statuses(h.receive(phone.request("OPTIONS"))) == [200]
    assert statuses(h.receive(phone.request("REGISTER"))) == [401]
    phone.cseq += 1
    assert statuses(h.receive(phone.request("SUBSCRIBE"))) == [405]
    phone.cseq += 1
    assert statuses(h.receive(phone.request("FROBNICATE"))) == [405]
    broken = bytes(phone.request("OPTIONS")).replace(b"Call-ID", b"X-Call-ID")
    [answer] = h.receive(broken)
    assert answer.data.startswith(b"SIP/2.0 400 Missing Call-ID")
    assert answered(h) == {
        "answered.OPTIONS.200": 1,
        "answered.REGISTER.401": 1,
        "answered.SUBSCRIBE.405": 1,
        "answered.other.405": 1,
        "answered.malformed.400": 1,
    }
    # The per-code totals agree with the per-method ones.
    stats = h.engine.stats()
    assert stats["responses_out.405"] == 2 and stats["responses_out.400"] == 1
