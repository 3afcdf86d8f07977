"""Brute-force and scanner protection (issue 7 §3), the pure tables and
through the engine on a virtual clock."""

from __future__ import annotations

from engine_harness import CLIENT, Harness, Phone, account, parsed, statuses

from sansio_sip._config import EngineConfig
from sansio_sip._guard import Guard, GuardConfig
from sansio_sip._message import Response


def test_k_failures_within_the_window_ban_the_source_for_the_ban_time() -> None:
    guard = Guard(GuardConfig(failures=3, window=60, ban_time=100))
    assert guard.failure("192.0.2.1", "a", now=0)[0] is False
    assert guard.failure("192.0.2.1", "b", now=10)[0] is False
    assert guard.failure("192.0.2.1", "c", now=20)[0] is True
    assert guard.banned("192.0.2.1", now=50)
    assert not guard.banned("192.0.2.2", now=50)
    assert not guard.banned("192.0.2.1", now=121)


def test_failures_spread_wider_than_the_window_never_ban() -> None:
    guard = Guard(GuardConfig(failures=3, window=60))
    for t in range(0, 1000, 31):  # one mistyped password every half minute
        assert guard.failure("192.0.2.1", "a", now=t)[0] is False


def test_username_failures_only_delay_and_the_delay_grows_to_a_cap() -> None:
    guard = Guard(GuardConfig(failures=1000, user_failures=2, base_delay=0.5, max_delay=4))
    delays = [guard.failure(f"198.51.100.{i}", "victim", now=i)[1] for i in range(8)]
    assert delays == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert not any(guard.banned(f"198.51.100.{i}", now=9) for i in range(8))


def test_tables_are_bounded() -> None:
    guard = Guard(GuardConfig(capacity=100))
    for i in range(10_000):
        guard.failure(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", f"user{i}", now=i / 1000)
    assert len(guard) <= 300


def test_clear_lifts_bans() -> None:
    guard = Guard(GuardConfig(failures=1))
    guard.failure("192.0.2.1", None, now=0)
    guard.failure("192.0.2.2", None, now=0)
    assert [ip for ip, _ in guard.bans(now=1)] == ["192.0.2.1", "192.0.2.2"]
    assert guard.clear("192.0.2.1") == 1
    assert guard.clear() == 1
    assert guard.bans(now=1) == []


def test_scanner_user_agents_are_recognised_only_when_enabled() -> None:
    assert not Guard(GuardConfig()).is_scanner("friendly-scanner")
    guard = Guard(GuardConfig(drop_scanners=True))
    assert guard.is_scanner("friendly-scanner")
    assert guard.is_scanner("sipvicious 0.3.4")
    assert not guard.is_scanner("Linphone/5.2 (belle-sip)")
    assert not guard.is_scanner(None)


def _wrong_password_register(h: Harness, phone: Phone, source: tuple[str, int]) -> list[int]:
    first = phone.request("REGISTER")
    answers = [m for m in parsed(h.receive(first, source=source)) if isinstance(m, Response)]
    if not answers:
        return []
    phone.cseq += 1
    second = phone.authorize(phone.request("REGISTER"), answers[-1], password="guess")
    return statuses(h.receive(second, source=source))


def _guarded(**guard: object) -> Harness:
    h = Harness.make(account())
    h.engine = type(h.engine)(
        EngineConfig(
            nonce_secret=b"k" * 32,
            sip_address=("203.0.113.1", 5060),
            guard=GuardConfig(**guard),  # type: ignore[arg-type]
        ),
        entropy=__import__("random").Random(3).randbytes,
    )
    return h


def test_a_cracker_is_banned_while_the_owner_keeps_registering_from_elsewhere() -> None:
    h = _guarded(failures=5, user_failures=1000)
    attacker = ("192.0.2.66", 5060)
    results = []
    for i in range(8):
        results.append(_wrong_password_register(h, Phone(call_id=f"crack{i}@x"), attacker))
        h.advance(1)
    assert results[:5] == [[403]] * 5
    assert results[5:] == [[]] * 3  # banned: dropped without an answer
    assert [ip for ip, _ in h.engine.bans(now=h.now)] == ["192.0.2.66"]
    assert h.engine.stats()["dropped_banned"] >= 3
    # The owner, from their own address, is not affected.
    owner = Phone(call_id="owner@x")
    challenge = parsed(h.receive(owner.request("REGISTER"), source=CLIENT))[-1]
    assert isinstance(challenge, Response)
    owner.cseq += 1
    assert statuses(h.receive(owner.authorize(owner.request("REGISTER"), challenge))) == [200]
    assert h.engine.clear_bans("192.0.2.66") == 1
    assert _wrong_password_register(h, Phone(call_id="again@x"), attacker) == [403]


def test_repeated_failures_for_one_username_are_answered_slowly() -> None:
    h = _guarded(failures=1000, user_failures=2, base_delay=1.0, max_delay=8.0)
    for i in range(3):
        assert _wrong_password_register(h, Phone(call_id=f"s{i}@x"), (f"198.51.100.{i}", 5060)) \
            == ([403] if i < 2 else [])
    later = h.advance(1.5)
    assert statuses(later) == [403]


def test_scanner_options_are_dropped_when_enabled() -> None:
    h = _guarded(drop_scanners=True)
    probe = Phone().request("OPTIONS")
    probe.headers.set("User-Agent", "friendly-scanner")
    assert h.receive(probe) == []
    assert statuses(h.receive(Phone(call_id="ok@x").request("OPTIONS"))) == [200]


def test_too_many_header_fields_get_400() -> None:
    h = Harness.make()
    request = Phone().request("OPTIONS", extra=[("X-Junk", str(i)) for i in range(300)])
    [send] = h.receive(request)
    assert send.data.startswith(b"SIP/2.0 400 Too many header fields")


def test_a_store_that_does_not_keep_up_gets_503_not_a_queue() -> None:
    h = Harness.make(account(), max_pending_lookups=2)
    h.auto = False
    codes = []
    for i in range(4):
        phone = Phone(call_id=f"p{i}@x")
        first = phone.request("REGISTER")
        h.auto = True
        challenge = parsed(h.receive(first))[-1]
        h.auto = False
        assert isinstance(challenge, Response)
        phone.cseq += 1
        codes += statuses(h.receive(phone.authorize(phone.request("REGISTER"), challenge)))
    assert codes == [503, 503]
    assert len(h.pending) == 2


def test_one_off_sources_are_forgotten_after_the_window() -> None:
    # A spray of failures from 10,000 addresses, each failing once (a botnet,
    # or the soak's rotating sources), spread over two windows: only the last
    # window's addresses can still count, so only they are kept.
    guard = Guard(GuardConfig(window=60.0, failures=10))
    for n in range(10_000):
        now = n * 0.012  # 120 s in all
        guard.failure(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", f"user{n}", now=now)
    held = len(guard)
    assert held <= 2 * 5_001, held  # sources + usernames of the last 60 s
    assert held >= 2 * 4_900, held  # and those are still counted
    # An address that keeps failing inside the window is still banned.
    for _ in range(10):
        guard.failure("192.0.2.66", None, now=200.0)
    assert guard.banned("192.0.2.66", now=200.5)
    # Expired bans go too, without anyone asking about them.
    guard.failure("198.51.100.1", None, now=200.0 + 600.0 + 1.0)
    assert not guard.bans(now=801.0)
    assert len(guard) <= 3
