"""docs/operator-cli.md is generated from the click commands and the
ServerSettings field docs; this test keeps the file in step with the code.
Run with KX_REGEN_DOCS=1 to rewrite it after changing a command or setting."""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from kx_sipd.cli import main, render_reference
from kx_sipd.settings import ServerSettings

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "operator-cli.md"


def test_the_operator_reference_matches_the_commands() -> None:
    rendered = render_reference()
    if os.environ.get("KX_REGEN_DOCS") == "1":
        REFERENCE.write_text(rendered, encoding="utf-8")
    assert REFERENCE.read_text(encoding="utf-8") == rendered, (
        "docs/operator-cli.md is stale: run KX_REGEN_DOCS=1 python3 -m pytest "
        "tests/unit/test_cli_docs.py"
    )


def test_every_setting_is_a_serve_option_and_documented() -> None:
    serve = main.commands["serve"]
    options = {param.name for param in serve.params}
    rendered = render_reference()
    for field in attrs.fields(ServerSettings):
        assert field.name in options, f"serve has no --{field.name.replace('_', '-')}"
        assert field.metadata["doc"], field.name
        assert f"`{field.name.replace('_', '-')}`" in rendered


def test_every_command_is_in_the_reference() -> None:
    rendered = render_reference()
    for group in ("accounts", "routes", "calls"):
        for name in main.commands[group].commands:  # type: ignore[attr-defined]
            assert f"## `kx-sipd {group} {name}`" in rendered
    assert "## `kx-sipd serve`" in rendered
