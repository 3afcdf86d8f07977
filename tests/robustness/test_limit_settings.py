"""Every engine limit and guard knob is a ``kx-sipd serve`` option and a TOML
key, defaults to the engine's own safe default, and reaches EngineConfig."""

from __future__ import annotations

from pathlib import Path

import attrs
import click
import pytest

from kx_sipd._cli_serve import build_settings
from kx_sipd.cli import main
from kx_sipd.settings import ServerSettings
from sansio_sip import EngineConfig

SECRET = b"s" * 32

# serve option -> (EngineConfig field or guard field, a non-default value)
OPTIONS = {
    "max_message_size": ("max_message_size", 4096),
    "max_headers": ("max_headers", 40),
    "max_via_depth": ("max_via_depth", 8),
    "max_transactions": ("max_transactions", 300),
    "max_pending_lookups": ("max_pending_lookups", 30),
    "retry_after": ("retry_after", 9),
    "max_calls": ("max_calls", 7),
    "ban_failures": ("guard.failures", 5),
    "ban_window": ("guard.window", 20.0),
    "ban_time": ("guard.ban_time", 30.0),
    "slow_after": ("guard.user_failures", 3),
}


def _engine_value(config: EngineConfig, path: str) -> object:
    value: object = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _settings(*args: str) -> ServerSettings:
    command = main.commands["serve"]
    ctx = command.make_context("serve", list(args))
    return build_settings(ctx, dict(ctx.params))


def test_the_defaults_are_the_engines() -> None:
    engine_default = EngineConfig(nonce_secret=SECRET)
    config = EngineConfig(nonce_secret=SECRET, **_settings().engine_limits())
    assert config == engine_default
    # and ServerSettings() built without the CLI agrees with the CLI's defaults
    assert ServerSettings().engine_limits() == _settings().engine_limits()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_reaches_the_engine(name: str) -> None:
    path, value = OPTIONS[name]
    settings = _settings(f"--{name.replace('_', '-')}", str(value))
    config = EngineConfig(nonce_secret=SECRET, **settings.engine_limits())
    assert _engine_value(config, path) == value


def test_flags_reach_the_engine() -> None:
    settings = _settings("--drop-scanners", "--uniform-auth-failures")
    config = EngineConfig(nonce_secret=SECRET, **settings.engine_limits())
    assert config.guard.drop_scanners and config.uniform_auth_failures


def test_toml_keys(tmp_path: Path) -> None:
    toml = tmp_path / "kx.toml"
    toml.write_text(
        "ban-failures = 4\nban_time = 12.5\nmax-headers = 99\ndrop-scanners = true\n",
        encoding="utf-8",
    )
    config = EngineConfig(nonce_secret=SECRET, **_settings("--config", str(toml)).engine_limits())
    assert (config.guard.failures, config.guard.ban_time, config.max_headers) == (4, 12.5, 99)
    assert config.guard.drop_scanners


@pytest.mark.parametrize(
    "args",
    [
        ("--ban-failures", "0"),
        ("--ban-time", "0"),
        ("--max-message-size", "100"),
        ("--max-headers", "3"),
        ("--retry-after", "0"),
    ],
)
def test_unsafe_values_are_refused(args: tuple[str, ...]) -> None:
    with pytest.raises(click.BadParameter):
        _settings(*args)


def test_every_limit_field_is_documented() -> None:
    for name in (*OPTIONS, "drop_scanners"):
        field = attrs.fields_dict(ServerSettings)[name]
        assert len(field.metadata["doc"]) > 30, name
