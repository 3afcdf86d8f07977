"""Issue 3 over real sockets with SIPp: REGISTER with digest ([authentication]
and users from a CSV injection file) and an OPTIONS ping, against the real
``kx-sipd serve``, asserting the exact status lines of the guide (§6.1, §8, §9)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from calls_support import SIPP, KxServer, free_port, kx_cli, sipp_command, start_kx, users_file

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(SIPP is None, reason="sipp (OS package sip-tester) is not installed"),
]

USERS = [(f"user{i:02d}", f"pw-{i:02d}-Secret") for i in range(10)]


@pytest.fixture(scope="module")
def kx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KxServer]:
    directory = tmp_path_factory.mktemp("kx-register")
    db = directory / "kx.sqlite"
    for user, password in USERS:
        kx_cli(db, "accounts", "add", user, "--password", password, "--route", "echo")
    kx_cli(db, "accounts", "add", "sleepy", "--password", "sleepy-Secret", "--route", "echo")
    kx_cli(db, "accounts", "suspend", "sleepy")
    server = start_kx(directory, db)
    try:
        yield server
    finally:
        server.stop()


def _finals(sipp_messages: list, method: str = "REGISTER") -> list[str]:
    return [
        m.first_line
        for m in sipp_messages
        if not m.is_request and m.status is not None and m.status >= 200 and m.status != 401
    ]


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_sipp_registers_every_user_with_digest(
    kx: KxServer, tmp_path: Path, transport: str
) -> None:
    sipp = sipp_command(
        "reg", "register_accepted.xml", tmp_path, port=free_port(tcp_too=True),
        remote=kx.address, calls=len(USERS), transport=transport,
        extra=["-inf", str(users_file(tmp_path, USERS)), "-r", "20"],
    )  # fmt: skip
    sipp.start()
    assert sipp.wait(60) == 0, sipp.diagnostics()
    messages = sipp.messages()
    challenges = [m for m in messages if not m.is_request and m.status == 401]
    assert len(challenges) == len(USERS)
    assert _finals(messages) == ["SIP/2.0 200 OK"] * len(USERS)
    for answer in (m for m in messages if not m.is_request and m.status == 200):
        assert "expires=300" in (answer.header("Contact") or "")


@pytest.mark.parametrize(
    ("user", "password", "status_line"),
    [
        ("user01", "wrong-password", "SIP/2.0 403 Bad credentials"),
        ("nobody", "whatever", "SIP/2.0 403 Unknown user"),
        ("sleepy", "sleepy-Secret", "SIP/2.0 403 Unknown user"),
    ],
)
def test_sipp_register_failures_have_the_guides_reason_phrases(
    kx: KxServer, tmp_path: Path, user: str, password: str, status_line: str
) -> None:
    sipp = sipp_command(
        "bad", "register_forbidden.xml", tmp_path, port=free_port(), remote=kx.address,
        extra=["-inf", str(users_file(tmp_path, [(user, password)]))],
    )  # fmt: skip
    sipp.start()
    assert sipp.wait(30) == 0, sipp.diagnostics()
    assert _finals(sipp.messages()) == [status_line]


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_sipp_options_ping_needs_no_auth(kx: KxServer, tmp_path: Path, transport: str) -> None:
    sipp = sipp_command(
        "ping", "options_ping.xml", tmp_path, port=free_port(tcp_too=True),
        remote=kx.address, calls=5, transport=transport, extra=["-r", "10"],
    )  # fmt: skip
    sipp.start()
    assert sipp.wait(30) == 0, sipp.diagnostics()
    assert _finals(sipp.messages()) == ["SIP/2.0 200 OK"] * 5
