"""Brute force and enumeration with the real tools (sipvicious, Debian package
``sipvicious``) against ``kx-sipd serve`` on loopback.

* svcrack guesses alice's password from 127.0.0.1 (it binds the wildcard
  address, so the kernel picks that source) while a SIPp client with the
  right password registers alice from 127.0.0.2 the whole time: the guesses
  are answered (403) only until the ban (``--ban-failures 5``), then nothing
  is answered to 127.0.0.1 (svcrack gives up for lack of answers), and every
  one of the owner's registrations succeeds.
* svwar cannot enumerate: every request without credentials is challenged
  (401), known user or not, so it reports nothing. With credentials, the guide's distinct
  ``403 Unknown user`` / ``403 Bad credentials`` tell a prober which names
  exist; ``--uniform-auth-failures`` makes the two identical on the wire.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from robust_support import REALM, KxServer, Raw, authorization, free_port, nonce_of, sipp

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        not (shutil.which("svcrack") and shutil.which("svwar") and shutil.which("sipp")),
        reason="needs sipvicious (svcrack, svwar) and SIPp: scripts/install-test-deps.sh",
    ),
]

ATTACKER = "127.0.0.1"
OWNER = "127.0.0.2"
BAN_FAILURES = 5


def _time(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KxServer]:
    running = KxServer.start(
        tmp_path, "--ban-failures", str(BAN_FAILURES), "--ban-window", "60", "--ban-time", "120",
        ipv6=False,
    )  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


def test_svcrack_is_banned_while_the_owner_keeps_registering(
    server: KxServer, tmp_path: Path
) -> None:
    words = tmp_path / "passwords.txt"
    words.write_text("".join(f"guess{i}\n" for i in range(200)) + "alice-secret\n")
    owner: dict[str, subprocess.CompletedProcess[str]] = {}

    def register_all_along() -> None:
        owner["result"] = sipp(
            "register.xml",
            server.address,
            directory=tmp_path,
            calls=24,
            rate=2,
            timeout=60,
            local_ip=OWNER,
        )

    thread = threading.Thread(target=register_all_along)
    thread.start()
    crack = subprocess.run(
        ["svcrack", "-u", "alice", "-d", str(words), "-P", str(free_port()), "--maximumtime=4",
         f"udp://{server.address[0]}:{server.port}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    thread.join(timeout=120)
    assert not thread.is_alive()
    # svcrack never found the password (it is last in the list): it stopped
    # because the server stopped answering it.
    assert "found nothing" in crack.stderr, crack.stderr[-2000:]
    assert "since we last received a response" in crack.stderr, crack.stderr[-2000:]
    # The owner registered every time, from another address, during the attack.
    result = owner["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # While banned, alice still registers from yet another address.
    with Raw(server.address, bind="127.0.0.7") as raw:
        answer = raw.register("alice", "alice-secret")
        assert answer is not None and answer.status == 200, answer

    assert server.stop() == 0
    stats = server.exit_stats()
    events = server.log_events()
    banned = [e for e in events if e.get("event") == "guard.banned"]
    assert len(banned) == 1 and banned[0]["fields"]["source"] == ATTACKER, (
        banned,
        [e for e in events if e.get("event") in ("auth.failed", "server.signal")],
    )  # type: ignore[index]
    guesses = [
        e for e in events
        if e.get("event") == "transaction.answered"
        and str(e["fields"]["source"]).startswith(ATTACKER + ":")  # type: ignore[index]
        and e["fields"]["status"] == 403  # type: ignore[index]
    ]  # fmt: skip
    # The guess rate falls to zero at the ban: exactly BAN_FAILURES guesses were
    # ever answered, all before the ban; everything after was dropped unanswered.
    assert len(guesses) == BAN_FAILURES, guesses
    # (the answer to the guess that triggered the ban is logged just after it)
    assert all(_time(e) <= _time(banned[0]) + 0.5 for e in guesses), (guesses, banned)
    assert stats["auth.bad-credentials"] == BAN_FAILURES, stats
    assert stats["dropped_banned"] > 10, stats
    assert stats["auth.accepted"] >= 25, stats


def _wrong_password_answer(server: KxServer, user: str, source: str) -> str:
    uri = f"sip:{REALM}"
    with Raw(server.address, bind=source) as raw:
        raw.send(raw.request("REGISTER", uri, user=user))
        challenge = raw.final()
        assert challenge is not None and challenge.status == 401, challenge
        auth = authorization(user, "not-the-password", "REGISTER", uri, nonce_of(challenge))
        raw.send(raw.request("REGISTER", uri, user=user, new_call=False,
                             headers=(("Authorization", auth),)))  # fmt: skip
        answer = raw.final()
        assert answer is not None
        return f"{answer.status} {answer.reason}"


def _svwar(server: KxServer, tmp_path: Path, source: str) -> str:
    names = tmp_path / "names.txt"
    names.write_text("alice\ncarol\nmallory\nzed\n")
    war = subprocess.run(
        ["svwar", "-d", str(names), "-b", source, "--force", "--maximumtime=3",
         f"udp://{server.address[0]}:{server.port}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return war.stdout + war.stderr


@pytest.mark.parametrize("uniform", [False, True], ids=["guide-default", "uniform"])
def test_enumeration(uniform: bool, tmp_path: Path) -> None:
    extra = ("--uniform-auth-failures",) if uniform else ()
    with_server = KxServer.start(tmp_path, *extra, ipv6=False)
    try:
        # svwar probes without credentials: known and unknown names alike get
        # the same 401, so it finds nothing (not even with --force).
        report = _svwar(with_server, tmp_path, "127.0.0.8")
        assert "found nothing" in report, report[-2000:]
        assert not [line for line in report.splitlines() if "| alice" in line], report[-2000:]
        # With credentials (what svcrack sends), the answers differ only by default.
        known = _wrong_password_answer(with_server, "alice", "127.0.0.9")
        unknown = _wrong_password_answer(with_server, "mallory", "127.0.0.10")
        if uniform:
            assert known == unknown == "403 Forbidden"
        else:
            assert (known, unknown) == ("403 Bad credentials", "403 Unknown user")
    finally:
        assert with_server.stop() == 0
    # Logs and counters keep the true reason either way.
    stats = with_server.exit_stats()
    assert stats["auth.bad-credentials"] == 1 and stats["auth.unknown-user"] == 1, stats
