"""docs/operator-guide.md and docs/systemd/kx-sipd.service, checked against the code.

The account/route/call commands of the guide run (in-process) against a
temporary database; its configuration file loads through ``serve --config``;
its backup recipes are run while a store has the database open and writes to
it, and the backups open with the same realm, nonce secret and accounts; the
systemd unit is verified by systemd-analyze when the machine has it. Links in
the pages this project owns must point at files that exist.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from kx_sipd._cli_serve import build_settings
from kx_sipd.cli import main
from kx_sipd.settings import ServerSettings
from kx_sipd.store import Store

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operator-guide.md"
UNIT = ROOT / "docs" / "systemd" / "kx-sipd.service"
PAGE = GUIDE.read_text(encoding="utf-8")
PAGES = [
    ROOT / "README.md",
    GUIDE,
    ROOT / "docs" / "integrator-guide.md",
    ROOT / "docs" / "api.md",
    ROOT / "docs" / "config-reference.md",
]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def cli_commands() -> list[list[str]]:
    """The ``kx-sipd accounts|routes|calls`` lines of the guide's shell blocks, except
    those with a placeholder (CALL-ID) a new database cannot fill."""
    commands = []
    for block in code_blocks(PAGE, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) < 2 or words[0] != "kx-sipd":
                continue
            if words[1] not in ("accounts", "routes", "calls"):
                continue
            if any(re.fullmatch(r"[A-Z][A-Z-]+", word) for word in words):
                continue
            commands.append(words[1:])
    return commands


def test_the_guide_shows_the_everyday_commands() -> None:
    shown = {tuple(words[:2]) for words in cli_commands()}
    assert {("routes", "add"), ("accounts", "add"), ("accounts", "passwd")} <= shown
    assert {("accounts", "suspend"), ("calls", "list")} <= shown
    assert "kx-sipd calls show CALL-ID" in PAGE


def test_the_guides_commands_run_in_order(tmp_path: Path) -> None:
    db = tmp_path / "kx.sqlite"
    runner = CliRunner()
    for words in cli_commands():
        result = runner.invoke(main, [*words, "--db", str(db)], input="s3cret pw\ns3cret pw\n")
        assert result.exit_code == 0, f"kx-sipd {' '.join(words)}:\n{result.output}"
    with Store(db) as store:
        info = store.account_info("acmeclient")
        assert info is not None
        assert store.get_route("carrier1") is not None


def test_the_configuration_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KX_DB", raising=False)
    (toml,) = code_blocks(PAGE, "toml")
    path = tmp_path / "kx-sipd.toml"
    path.write_text(toml, encoding="utf-8")
    serve = main.commands["serve"]
    ctx = serve.make_context("serve", ["--config", str(path)])
    settings = build_settings(ctx, dict(ctx.params))
    assert settings.db == "/var/lib/kx-sipd/kx.sqlite"
    assert settings.advertised_sip_address == ("203.0.113.10", 5060)
    assert settings.advertised_rtp_address == "203.0.113.10"
    assert settings.drop_scanners and settings.max_calls == 2000
    assert settings.realm is None  # the guide says: omit it, the database decides


def test_the_defaults_the_guide_quotes() -> None:
    defaults = ServerSettings()
    assert f"`shutdown-grace` ({defaults.shutdown_grace:g} s)" in PAGE
    assert f"`ban-failures` failed authentications ({defaults.ban_failures})" in PAGE
    assert f"`ban-window` ({defaults.ban_window:g} s)" in PAGE
    assert f"`ban-time` ({defaults.ban_time:g} s)" in PAGE
    assert f"`slow-after` ({defaults.slow_after})" in PAGE
    assert defaults.rtp_range == (20000, 20999) and "20000–20999" in PAGE


# -- backups -----------------------------------------------------------------------


def backup_commands(source: Path, target_dir: Path) -> list[str]:
    """The guide's sqlite3 one-liners, pointed at ``source`` and ``target_dir``."""
    commands = []
    for block in code_blocks(PAGE, "sh"):
        for line in block.splitlines():
            if line.startswith("sqlite3 "):
                line = line.replace("/var/lib/kx-sipd/kx.sqlite", str(source))
                commands.append(line.replace("/var/backups/kx-sipd", str(target_dir)))
    assert len(commands) == 2, commands  # .backup and VACUUM INTO
    return commands


def a_live_database(path: Path) -> Store:
    """A database in use: an open store that has written accounts and keeps writing."""
    store = Store(path)
    store.add_account("alice", "alice pw")
    store.add_account("bob", "bob pw")
    return store


def assert_same_database(backup: Path, store: Store) -> None:
    with Store(backup, create=False) as copy:
        assert (copy.realm, copy.nonce_secret) == (store.realm, store.nonce_secret)
        assert {info.username for info in copy.list_accounts()} >= {"alice", "bob"}
        assert copy.get_account("alice") == store.get_account("alice")


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 program is not installed")
def test_the_backup_recipes_work_while_the_database_is_in_use(tmp_path: Path) -> None:
    source = tmp_path / "kx.sqlite"
    backups = tmp_path / "backups"
    backups.mkdir()
    store = a_live_database(source)
    try:
        for command in backup_commands(source, backups):
            subprocess.run(command, shell=True, check=True, timeout=60, capture_output=True)
            store.set_password("bob", "bob new pw")  # the server goes on writing
        for name in ("kx.sqlite", "kx-compact.sqlite"):
            assert_same_database(backups / name, store)
    finally:
        store.close()


def test_the_python_backup_recipe_works(tmp_path: Path) -> None:
    match = re.search(r'`python3 -c "(import sqlite3; [^"]+)"`', PAGE)
    assert match is not None, "the guide no longer shows the Python backup"
    store = a_live_database(tmp_path / "kx.sqlite")
    try:
        subprocess.run([sys.executable, "-c", match.group(1)], cwd=tmp_path, check=True, timeout=60)
        assert_same_database(tmp_path / "backup.sqlite", store)
    finally:
        store.close()


# -- the systemd unit -----------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_the_unit_runs_what_the_guide_describes() -> None:
    service = unit()["Service"]
    assert (
        service["ExecStart"] == "/opt/kx-sipd/bin/kx-sipd serve --config /etc/kx-sipd/kx-sipd.toml"
    )
    assert service["ExecStart"].split()[0] in PAGE and "/etc/kx-sipd/kx-sipd.toml" in PAGE
    assert service["User"] == "kx-sipd" and "useradd --system" in PAGE
    assert service["WorkingDirectory"] == "/var/lib/kx-sipd"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    # Room for the graceful stop: the grace period, then the drain and the record writes.
    assert float(service["TimeoutStopSec"]) >= ServerSettings().shutdown_grace + 10
    assert service["UMask"] == "0077"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # The real ExecStart names /opt/kx-sipd, absent here: verify a copy naming an existing
    # executable, so everything else in the unit is checked.
    text = UNIT.read_text(encoding="utf-8").replace("/opt/kx-sipd/bin/kx-sipd", sys.executable)
    copy = tmp_path / "kx-sipd.service"
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "kx-sipd.service" in line and "is not executable" not in line
    ]
    assert not problems, "\n".join(problems)


# -- links ------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_relative_links_point_at_files(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_the_config_reference_covers_the_settings_the_guide_names() -> None:
    reference = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    names = {field.name.replace("_", "-") for field in attrs.fields(ServerSettings)}
    quoted = set(re.findall(r"`([a-z]+(?:-[a-z]+)+)`", PAGE)) & {n for n in names if "-" in n}
    assert quoted, "the guide names no settings"
    for name in quoted | {n for n in names if n in re.findall(r"`([a-z-]+)`", PAGE)}:
        assert f"### `{name}`" in reference, name


def test_the_monitoring_recipe_matches_the_code() -> None:
    """The "Is it running?" recipe: the default control address, the settings it names (quoted in
    TOML form) and the status command are the real ones."""
    from kx_sipd.control import DEFAULT_CONTROL

    section = PAGE.split("### Is it running?", 1)[1].split("\n## ", 1)[0]
    host, port = DEFAULT_CONTROL
    assert f"{host}:{port} unless `metrics`" in section.replace("\n", " ")
    assert section.count(f"http://{host}:{port}/") == 2
    names = {field.name.replace("_", "-") for field in attrs.fields(ServerSettings)}
    for key in re.findall(r'`([a-z-]+) = "', section):
        assert key in names, key
    result = CliRunner().invoke(main, ["status", "--help"])
    assert result.exit_code == 0 and "relay" in result.output and "bans" in result.output
