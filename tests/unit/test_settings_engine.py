"""Serve options reach the engine: what an operator sets is what runs."""

from __future__ import annotations

from kx_sipd.settings import ServerSettings


def test_one_device_per_account_and_local_names_reach_the_engine_config() -> None:
    settings = ServerSettings(
        one_device_per_account=True, listen=(("0.0.0.0", 5060), ("192.0.2.10", 5080))
    )
    limits = settings.engine_limits()
    assert limits["one_device_per_account"] is True
    assert limits["local_names"] == ("192.0.2.10",)  # wildcards name nobody
    assert ServerSettings().engine_limits()["one_device_per_account"] is False


def test_hep_defaults_off() -> None:
    assert ServerSettings().hep is None
    assert ServerSettings().hep_agent_id == 2001
