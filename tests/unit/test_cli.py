"""The ``kx-sipd`` command line: every command through click's CliRunner, the
machine-readable outputs, clear errors with non-zero exits, serve's settings
(TOML file, environment, --demo), and one run of the installed script."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from kx_sipd.cli import main
from kx_sipd.settings import DEMO_PASSWORD, ServerSettings
from kx_sipd.store import Store
from sansio_sip import CallRecordData, LadderEntry, MediaStats

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "kx.sqlite")


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=False)


def ok(*args: str, input: str | None = None) -> str:
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: str, input: str | None = None, code: int = 1) -> str:
    result = run(*args, input=input)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def json_lines(output: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines() if line.strip()]


# -- accounts --------------------------------------------------------------------


def test_accounts_lifecycle(db: str) -> None:
    ok("routes", "add", "carrier", "--host", "203.0.113.5", "--db", db)
    out = ok(
        "accounts", "add", "alice", "--password", "s3cret", "--route", "carrier",
        "--allow", "1", "--allow", "52", "--max-calls", "2", "--max-cps", "0.5",
        "--caller-id", "+15551230000", "--source", "198.51.100.0/24", "--db", db,
    )  # fmt: skip
    assert "account alice added (realm sip.kx21.com)" in out

    (listed,) = json_lines(ok("accounts", "list", "--json", "--db", db))
    assert listed["username"] == "alice"
    assert listed["route"] == "carrier"
    assert listed["allowed_prefixes"] == ["1", "52"]
    assert listed["allowed_sources"] == ["198.51.100.0/24"]
    assert (listed["max_calls"], listed["max_cps"]) == (2, 0.5)

    table = ok("accounts", "list", "--db", db)
    assert "alice" in table and "carrier" in table
    shown = json_lines(ok("accounts", "show", "alice", "--json", "--db", db))[0]
    assert shown == listed
    assert "max concurrent calls  2" in ok("accounts", "show", "alice", "--db", db)

    ok("accounts", "set", "alice", "--max-calls", "0", "--allow-any", "--caller-id", "", "--db", db)
    (changed,) = json_lines(ok("accounts", "list", "--json", "--db", db))
    assert (changed["max_calls"], changed["allowed_prefixes"], changed["caller_id"]) == (
        None,
        [],
        None,
    )

    ok("accounts", "suspend", "alice", "--db", db)
    assert json_lines(ok("accounts", "list", "--json", "--db", db))[0]["status"] == "suspended"
    ok("accounts", "resume", "alice", "--db", db)
    assert json_lines(ok("accounts", "list", "--json", "--db", db))[0]["status"] == "active"

    ok("accounts", "passwd", "alice", "--password", "changed", "--db", db)
    with Store(db) as store:
        account = store.get_account("alice")
    assert account is not None
    assert account.ha1["MD5"] == hashlib.md5(b"alice:sip.kx21.com:changed").hexdigest()

    ok("accounts", "delete", "alice", "--db", db)
    assert ok("accounts", "list", "--json", "--db", db) == ""


def test_credentials_are_never_printed(db: str) -> None:
    ok("accounts", "add", "alice", "--password", "s3cret", "--db", db)
    ha1 = hashlib.md5(b"alice:sip.kx21.com:s3cret").hexdigest()
    for args in (("list",), ("list", "--json"), ("show", "alice"), ("show", "alice", "--json")):
        out = ok("accounts", *args, "--db", db)
        assert ha1 not in out and "s3cret" not in out and "ha1" not in out


def test_password_from_stdin_and_from_the_prompt(db: str) -> None:
    ok("accounts", "add", "alice", "--password", "-", "--db", db, input="from stdin\n")
    ok("accounts", "add", "bob", "--db", db, input="typed\ntyped\n")
    with Store(db) as store:
        alice, bob = store.get_account("alice"), store.get_account("bob")
    assert alice is not None and bob is not None
    assert alice.ha1["MD5"] == hashlib.md5(b"alice:sip.kx21.com:from stdin").hexdigest()
    assert bob.ha1["MD5"] == hashlib.md5(b"bob:sip.kx21.com:typed").hexdigest()
    assert "must not be empty" in fails(
        "accounts", "add", "carol", "--password", "-", "--db", db, input="\n", code=2
    )


def test_realm_is_chosen_when_the_database_is_made(db: str) -> None:
    out = ok("accounts", "add", "alice", "--password", "pw", "--realm", "voice.example", "--db", db)
    assert "realm voice.example" in out
    ok("accounts", "add", "bob", "--password", "pw", "--realm", "voice.example", "--db", db)
    out = fails("accounts", "add", "carol", "--password", "pw", "--realm", "other", "--db", db)
    assert "realm 'voice.example', not 'other'" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("accounts", "add", "alice", "--password", "pw", "--route", "nope"), "no route 'nope'"),
        (("accounts", "add", "bad user", "--password", "pw"), "invalid username"),
        (("accounts", "add", "x", "--password", "pw", "--source", "10.1"), "invalid source"),
        (("accounts", "add", "x", "--password", "pw", "--allow", "1a"), "invalid destination"),
        (("accounts", "passwd", "ghost", "--password", "pw"), "no account 'ghost'"),
        (("accounts", "suspend", "ghost"), "no account 'ghost'"),
        (("accounts", "resume", "ghost"), "no account 'ghost'"),
        (("accounts", "delete", "ghost"), "no account 'ghost'"),
        (("accounts", "show", "ghost"), "no account 'ghost'"),
        (("accounts", "set", "ghost", "--max-calls", "3"), "no account 'ghost'"),
        (("routes", "delete", "ghost"), "no route 'ghost'"),
        (("routes", "set", "ghost", "--port", "5080"), "no route 'ghost'"),
        (("routes", "delete", "echo"), "built in"),
        (("routes", "add", "echo", "--host", "x"), "built in"),
        (("calls", "show", "nothing@here"), "no call with Call-ID 'nothing@here'"),
    ],
)
def test_operator_errors_are_one_clear_line_and_exit_1(
    db: str, args: tuple[str, ...], message: str
) -> None:
    Store(db).close()
    out = fails(*args, "--db", db)
    assert out.startswith("Error: ") and message in out


@pytest.mark.parametrize(
    "args",
    [
        ("accounts", "add", "x", "--password", "pw", "--max-calls", "0"),
        ("accounts", "set", "x"),
        ("accounts", "set", "x", "--route", "r", "--no-route"),
        ("routes", "add", "r"),
        ("routes", "add", "r", "--host", "h", "--transport", "sctp"),
        ("calls", "list", "--json", "--csv"),
        ("calls", "list", "--since", "yesterday"),
    ],
)
def test_usage_errors_exit_2(db: str, args: tuple[str, ...]) -> None:
    Store(db).close()
    fails(*args, "--db", db, code=2)


def test_reading_commands_do_not_create_a_database(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sqlite")
    for args in (("accounts", "list"), ("routes", "list"), ("calls", "list")):
        assert "no database at" in fails(*args, "--db", missing)
    assert not os.path.exists(missing)


def test_the_database_comes_from_kx_db(tmp_path: Path) -> None:
    path = str(tmp_path / "env.sqlite")
    result = run("accounts", "add", "alice", "--password", "pw", env={"KX_DB": path})
    assert result.exit_code == 0, result.output
    with Store(path) as store:
        assert store.account_info("alice") is not None


def test_a_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"garbage" * 1000)
    assert "not a database" in fails("accounts", "list", "--db", str(path))


# -- routes ----------------------------------------------------------------------


def test_routes_lifecycle(db: str) -> None:
    ok(
        "routes", "add", "carrier", "--host", "203.0.113.5", "--port", "5080",
        "--transport", "TCP", "--strip", "1", "--prefix", "00", "--db", db,
    )  # fmt: skip
    routes = {
        route["name"]: route for route in json_lines(ok("routes", "list", "--json", "--db", db))
    }
    assert routes["carrier"] == {
        "name": "carrier",
        "host": "203.0.113.5",
        "port": 5080,
        "transport": "tcp",
        "strip": 1,
        "prefix": "00",
    }
    assert routes["echo"]["host"] == "echo"
    assert "already exists" in fails("routes", "add", "carrier", "--host", "x", "--db", db)

    assert "route carrier changed" in ok("routes", "set", "carrier", "--port", "5090", "--db", db)
    assert "route other added" in ok("routes", "set", "other", "--host", "192.0.2.1", "--db", db)
    routes = {
        route["name"]: route for route in json_lines(ok("routes", "list", "--json", "--db", db))
    }
    assert routes["carrier"]["port"] == 5090 and routes["carrier"]["prefix"] == "00"
    assert routes["other"]["transport"] == "udp"
    assert "kx-sipd echo test" in ok("routes", "list", "--db", db)

    ok("accounts", "add", "alice", "--password", "pw", "--route", "carrier", "--db", db)
    assert "used by accounts: alice" in fails("routes", "delete", "carrier", "--db", db)
    ok("accounts", "set", "alice", "--no-route", "--db", db)
    ok("routes", "delete", "carrier", "--db", db)
    names = [route["name"] for route in json_lines(ok("routes", "list", "--json", "--db", db))]
    assert names == ["echo", "other"]


# -- calls -----------------------------------------------------------------------


def seed_calls(db: str) -> None:
    invite = "INVITE sip:17752180264@sip.kx21.com SIP/2.0\r\nCall-ID: one@client\r\n\r\n"
    with Store(db) as store:
        store.write_call_record(
            CallRecordData(
                call_ref="ref-1",
                account="alice",
                a_call_id="one@client",
                b_call_id="one@kx",
                source="198.51.100.7:5062",
                transport="UDP",
                user_agent="Zoiper, rv2.10",
                dialed="17752180264",
                sent_digits="7752180264",
                route="carrier",
                start_wall=1_714_561_200.0,  # 2024-05-01T11:00:00Z
                answer_wall=1_714_561_203.0,
                end_wall=1_714_561_213.5,
                final_status=200,
                ended_by="client",
                reason="BYE from the client",
                codec="PCMU",
                ladder=(
                    LadderEntry(
                        wall=1_714_561_200.25,
                        direction="in",
                        leg="A",
                        peer="198.51.100.7:5062",
                        transport="UDP",
                        message=invite,
                    ),
                    LadderEntry(
                        wall=1_714_561_200.5,
                        direction="out",
                        leg="B",
                        peer="203.0.113.5:5060",
                        transport="UDP",
                        message="INVITE sip:7752180264@203.0.113.5 SIP/2.0\r\n\r\n",
                    ),
                ),
            )
        )
        store.attach_media_stats("ref-1", MediaStats(packets_in=500, bytes_in=86000), None)
        store.write_call_record(
            CallRecordData(
                call_ref="ref-2",
                account="bob",
                a_call_id="two@client",
                b_call_id=None,
                source="[2001:db8::7]:5060",
                transport="TCP",
                user_agent="Linphone",
                dialed="525512345678",
                sent_digits=None,
                route=None,
                start_wall=1_714_564_800.0,  # 2024-05-01T12:00:00Z
            )
        )


def test_calls_list_as_text_json_and_csv(db: str) -> None:
    seed_calls(db)
    text = ok("calls", "list", "--db", db)
    assert text.splitlines()[1].startswith("2024-05-01T12:00:00.000Z  bob")
    assert "(up)" in text

    first, second = json_lines(ok("calls", "list", "--json", "--db", db))
    assert (first["call_ref"], second["call_ref"]) == ("ref-2", "ref-1")
    assert second["start"] == "2024-05-01T11:00:00.000Z"
    assert second["duration"] == 13.5 and second["billable"] == 11
    assert second["a_media"]["packets_in"] == 500 and second["b_media"] is None
    assert "ladder" not in second

    rows = list(csv.DictReader(io.StringIO(ok("calls", "list", "--csv", "--db", db))))
    assert [row["call_ref"] for row in rows] == ["ref-2", "ref-1"]
    assert rows[1]["user_agent"] == "Zoiper, rv2.10"
    assert rows[1]["a_packets_in"] == "500" and rows[1]["b_packets_in"] == ""
    assert rows[1]["billable"] == "11" and rows[0]["end_wall"] == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--account", "alice"), ["ref-1"]),
        (("--since", "2024-05-01T11:30:00Z"), ["ref-2"]),
        (("--since", "2024-05-01T11:30:00"), ["ref-2"]),  # naive means UTC
        (("--since", "2024-05-01T13:30:00+02:00"), ["ref-2"]),
        (("--until", "1714563000"), ["ref-1"]),
        (("--call-id", "one@kx"), ["ref-1"]),
        (("--call-id", "two@client"), ["ref-2"]),
        (("--limit", "1"), ["ref-2"]),
        (("--limit", "0"), ["ref-2", "ref-1"]),
    ],
)
def test_calls_list_filters(db: str, args: tuple[str, ...], expected: list[str]) -> None:
    seed_calls(db)
    found = json_lines(ok("calls", "list", "--json", *args, "--db", db))
    assert [call["call_ref"] for call in found] == expected


def test_calls_show_prints_the_record_and_its_ladder(db: str) -> None:
    seed_calls(db)
    text = ok("calls", "show", "one@client", "--db", db)
    assert "Call-ID (carrier)  one@kx" in text
    assert "final status       200" in text
    assert "in 500 pkts/86000 B" in text
    assert (
        "2024-05-01T11:00:00.250Z  leg A  <- 198.51.100.7:5062 UDP  INVITE sip:17752180264" in text
    )
    assert "2024-05-01T11:00:00.500Z  leg B  -> 203.0.113.5:5060 UDP  INVITE sip:7752180264" in text
    assert "      Call-ID: one@client" in text
    assert "Call-ID: one@client" not in ok("calls", "show", "ref-1", "--summary", "--db", db)

    (shown,) = json_lines(ok("calls", "show", "one@kx", "--json", "--db", db))
    assert shown["call_ref"] == "ref-1"
    assert [entry["leg"] for entry in shown["ladder"]] == ["A", "B"]
    assert shown["ladder"][0]["message"].startswith("INVITE sip:17752180264")


# -- serve -----------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServerSettings]:
    """Replaces the server wiring with a recorder of the settings it is given."""
    calls: list[ServerSettings] = []
    fake = types.ModuleType("kx_sipd.app")
    fake.run_server = calls.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kx_sipd.app", fake)
    return calls


def test_serve_defaults(served: list[ServerSettings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KX_DB", raising=False)
    ok("serve")
    (settings,) = served
    assert settings.listen == (("0.0.0.0", 5060),)
    assert settings.db == "kx.sqlite"
    assert settings.realm is None
    assert settings.advertised_sip_address == ("127.0.0.1", 5060)
    assert (settings.backend, settings.driver, settings.log_level) == ("asyncio", "anyio", "info")
    assert settings.rtp_range == (20000, 20999)
    assert settings.media_timeout == 60.0 and settings.echo_number == "9196"


def test_serve_options_reach_the_settings(served: list[ServerSettings]) -> None:
    ok(
        "serve", "--listen", "[::1]:5070", "--listen", "127.0.0.1", "--db", "x.sqlite",
        "--realm", "voice.example", "--backend", "trio", "--driver", "socket",
        "--log-level", "debug", "--sip-address", "sip.example.com", "--relay", "10.0.0.9:22220",
        "--relay-secret", "0123456789abcdef", "--rtp-range", "30000-30099",
        "--rtp-address", "192.0.2.10", "--media-timeout", "30", "--echo-number", "1234",
        "--max-calls", "10", "--uniform-auth-failures", "--metrics", "127.0.0.1:9100",
    )  # fmt: skip
    (settings,) = served
    assert settings.listen == (("::1", 5070), ("127.0.0.1", 5060))
    assert settings.sip_address == ("sip.example.com", 5070)  # the listen port
    assert settings.relay == ("10.0.0.9", 22220)
    assert settings.rtp_range == (30000, 30099)
    assert settings.advertised_rtp_address == "192.0.2.10"
    assert settings.uniform_auth_failures and settings.metrics == ("127.0.0.1", 9100)
    assert (settings.backend, settings.driver, settings.log_level) == ("trio", "socket", "debug")


def test_serve_reads_a_toml_file_below_the_command_line_and_environment(
    served: list[ServerSettings], tmp_path: Path
) -> None:
    config = tmp_path / "kx.toml"
    config.write_text(
        'listen = "127.0.0.1:5080"\n'
        'log-level = "warning"\n'
        "relay_shards = 2\n"
        'db = "from-file.sqlite"\n'
        "uniform-auth-failures = true\n"
        "media-timeout = 15\n"
    )
    result = run(
        "serve", "--config", str(config), "--log-level", "error", env={"KX_DB": "from-env.sqlite"}
    )
    assert result.exit_code == 0, result.output
    (settings,) = served
    assert settings.listen == (("127.0.0.1", 5080),)
    assert settings.log_level == "error"  # the command line wins
    assert settings.db == "from-env.sqlite"  # the environment wins over the file
    assert settings.relay_shards == 2 and settings.uniform_auth_failures
    assert settings.media_timeout == 15.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ("listen = [\n", "not valid TOML"),
        ('log-level = "loud"\n', "loud"),
    ],
)
def test_serve_refuses_a_bad_config_file(
    served: list[ServerSettings], tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "kx.toml"
    config.write_text(content)
    assert message in fails("serve", "--config", str(config), code=2)
    assert served == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listen", "1.2.3.4:99999"), "outside 1-65535"),
        (("--listen", "[::1"), "missing ']'"),
        (("--relay", "10.0.0.9:22220"), "needs --relay-secret"),
        (("--rtp-range", "30000-29000"), "above the last"),
        (("--echo-number", "12a"), "digits"),
        (("--config", "/nonexistent/kx.toml"), "cannot read"),
    ],
)
def test_serve_refuses_bad_options(
    served: list[ServerSettings], args: tuple[str, ...], message: str
) -> None:
    assert message in fails("serve", *args, code=2)
    assert served == []


def test_serve_demo_makes_the_demo_database(
    served: list[ServerSettings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KX_DB", raising=False)
    for _ in range(2):  # a second run reuses the database
        ok("serve", "--demo")
    settings = served[-1]
    assert settings.demo and settings.db == "kx-demo.sqlite"
    assert settings.listen == (("127.0.0.1", 5060),)
    with Store(tmp_path / "kx-demo.sqlite") as store:
        account = store.get_account("demo")
        assert store.realm == "sip.kx21.com"
    assert account is not None and account.active
    assert account.route is not None and account.route.name == "echo"
    expected = hashlib.md5(f"demo:sip.kx21.com:{DEMO_PASSWORD}".encode()).hexdigest()
    assert account.ha1["MD5"] == expected


def test_serve_demo_with_a_realm_mismatch_stops_with_a_clear_error(
    served: list[ServerSettings], db: str
) -> None:
    Store(db, realm="voice.example").close()
    out = fails("serve", "--demo", "--db", db, "--realm", "sip.kx21.com")
    assert "realm 'voice.example'" in out
    assert served == []


# -- the installed script ------------------------------------------------------------


def test_the_installed_script_runs(tmp_path: Path) -> None:
    script = shutil.which("kx-sipd")
    command = [script] if script else [sys.executable, "-m", "kx_sipd"]
    db = str(tmp_path / "kx.sqlite")
    env = {**os.environ, "KX_DB": db}
    subprocess.run(
        [*command, "accounts", "add", "alice", "--password", "-"],
        input=b"pw\n",
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    listed = subprocess.run(
        [*command, "accounts", "list", "--json"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert [row["username"] for row in json_lines(listed.stdout.decode())] == ["alice"]
    missing = subprocess.run(
        [*command, "accounts", "list", "--db", str(tmp_path / "none.sqlite")],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert missing.stderr.decode().startswith("Error: no database at")
