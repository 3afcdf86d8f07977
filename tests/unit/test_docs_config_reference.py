"""docs/config-reference.md is generated from the code: the field docs of
``kx_sipd.settings.ServerSettings`` and the ``kx-sipd serve`` options (types,
ranges, environment variables). This test renders it and fails when the file
is stale; run with KX_REGEN_DOCS=1 to rewrite it after changing a setting:

    KX_REGEN_DOCS=1 python3 -m pytest tests/unit/test_docs_config_reference.py

It also checks what the page promises: the example file it prints loads
through ``serve --config`` and gives the defaults it lists, and each default it
lists is the one that applies (the option's and the setting's agree).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import attrs
import click
import pytest

from kx_sipd._cli_common import AddressType, PortRangeType
from kx_sipd._cli_serve import build_settings
from kx_sipd.cli import main
from kx_sipd.settings import ServerSettings, format_address

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
SERVE: click.Command = main.commands["serve"]

HEADER = """\
# kx-sipd configuration reference

Generated from `kx_sipd/settings.py` (each setting's documentation) and the
`kx-sipd serve` options by `tests/unit/test_docs_config_reference.py`; run
`KX_REGEN_DOCS=1 python3 -m pytest tests/unit/test_docs_config_reference.py`
after changing a setting. The operator guide ([operator-guide.md](operator-guide.md))
explains how the pieces fit; the commands are in [operator-cli.md](operator-cli.md).

## The file

`kx-sipd serve --config FILE` reads a [TOML](https://toml.io) file of flat
`key = value` lines, one per setting below. Keys are the option names without
the leading dashes; dashes and underscores are both accepted (`log-level` or
`log_level`). An unknown key, or a file that is not valid TOML, stops `serve`
with an error naming it.

Precedence, highest first: the command line, then the environment variables
named below, then the file, then the defaults. So a systemd unit can keep
secrets in the environment and everything else in the file.

## Every setting at its default

Settings without a default are shown commented out, with the form their
value takes.

"""


def serve_params() -> dict[str, click.Parameter]:
    return {param.name: param for param in SERVE.params if param.name and param.name != "config"}


def has_default(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | tuple | list)


def toml_value(value: Any, param: click.Parameter) -> str:
    """``value`` (a ServerSettings value) as the TOML the file takes for it."""
    if param.multiple:
        return "[" + ", ".join(_scalar(item, param.type) for item in value) + "]"
    return _scalar(value, param.type)


def _scalar(value: Any, kind: click.ParamType) -> str:
    if isinstance(kind, AddressType):
        return json.dumps(format_address(value))
    if isinstance(kind, PortRangeType):
        return json.dumps(f"{value[0]}-{value[1]}")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def placeholder(param: click.Parameter) -> str:
    """The form a value takes, for settings without a default."""
    kind = param.type
    if isinstance(kind, click.types.BoolParamType):
        return "true"
    if isinstance(kind, click.types.IntParamType | click.types.FloatParamType):
        return param.metavar or "0"
    return json.dumps(param.metavar or kind.name.upper())


def describe_type(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, click.types.BoolParamType):
        text = "boolean"
    elif isinstance(kind, click.Choice):
        text = "string, one of " + ", ".join(f"`{choice}`" for choice in kind.choices)
    elif isinstance(kind, AddressType | PortRangeType):
        text = f"string `{kind.name}`"
    elif isinstance(kind, click.types.IntParamType | click.types.FloatParamType):
        text = "integer" if isinstance(kind, click.types.IntParamType) else "number"
        text += _describe_range(kind)
    elif isinstance(kind, click.Path):
        text = "string (a file path)"
    else:
        text = "string"
    if param.multiple:
        text = f"array, each a {text}"
    return text


def _describe_range(kind: click.ParamType) -> str:
    low = getattr(kind, "min", None)
    high = getattr(kind, "max", None)
    parts = []
    if low is not None:
        parts.append(f"{'>' if getattr(kind, 'min_open', False) else '≥'} {low}")
    if high is not None:
        parts.append(f"{'<' if getattr(kind, 'max_open', False) else '≤'} {high}")
    return f" ({', '.join(parts)})" if parts else ""


def render_config_reference() -> str:
    params = serve_params()
    fields = attrs.fields(ServerSettings)
    example = ["```toml"]
    sections = ["## Settings", ""]
    for field in fields:
        key = field.name.replace("_", "-")
        param = params[field.name]
        default = field.default
        if has_default(default):
            shown = toml_value(default, param)
            example.append(f"{key} = {shown}")
            default_text = f"`{shown}`"
        else:
            example.append(f"# {key} = {placeholder(param)}")
            default_text = "none"
        option = "`--" + key + "`" + (" (repeat for several)" if param.multiple else "")
        envvar = param.envvar if isinstance(param.envvar, str) else None
        doc = str(field.metadata["doc"])
        sections.extend(
            [
                f"### `{key}`",
                "",
                f"- type: {describe_type(param)}",
                f"- default: {default_text}",
                f"- command line: {option}",
                *([f"- environment: `{envvar}`"] if envvar else []),
                "",
                doc,
                "",
            ]
        )
    example.extend(["```", ""])
    return HEADER + "\n".join(example) + "\n" + "\n".join(sections).rstrip("\n") + "\n"


# -- the tests ------------------------------------------------------------------


def test_the_config_reference_is_current() -> None:
    rendered = render_config_reference()
    if os.environ.get("KX_REGEN_DOCS") == "1":
        REFERENCE.write_text(rendered, encoding="utf-8")
    assert REFERENCE.read_text(encoding="utf-8") == rendered, (
        "docs/config-reference.md is stale: run KX_REGEN_DOCS=1 python3 -m pytest "
        "tests/unit/test_docs_config_reference.py"
    )


def test_every_setting_is_a_serve_option_and_every_option_a_setting() -> None:
    fields = {field.name for field in attrs.fields(ServerSettings)}
    assert set(serve_params()) == fields


def example_toml(page: str) -> str:
    match = re.search(r"^```toml\n(.*?)^```", page, re.MULTILINE | re.DOTALL)
    assert match is not None, "the page has no TOML example"
    return match.group(1)


def load_with_serve(tmp_path: Path, toml: str) -> ServerSettings:
    path = tmp_path / "kx-sipd.toml"
    path.write_text(toml, encoding="utf-8")
    ctx = SERVE.make_context("serve", ["--config", str(path)])
    return build_settings(ctx, dict(ctx.params))


def test_the_example_file_loads_and_gives_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for param in serve_params().values():  # the environment would win over the file
        if isinstance(param.envvar, str):
            monkeypatch.delenv(param.envvar, raising=False)
    settings = load_with_serve(tmp_path, example_toml(render_config_reference()))
    assert settings == ServerSettings()


def test_a_file_value_reaches_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KX_DB", raising=False)
    settings = load_with_serve(
        tmp_path,
        'listen = ["127.0.0.1:5070", "[::1]:5070"]\nlog_level = "debug"\n'
        'rtp-range = "30000-30999"\ndrop-scanners = true\nmax-calls = 12\n',
    )
    assert settings.listen == (("127.0.0.1", 5070), ("::1", 5070))
    assert (settings.log_level, settings.rtp_range) == ("debug", (30000, 30999))
    assert (settings.drop_scanners, settings.max_calls) == (True, 12)


def test_an_unknown_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(click.BadParameter, match="unknown setting 'max-cals'"):
        load_with_serve(tmp_path, "max-cals = 3\n")


# Settings whose documented default differs from what `kx-sipd serve` runs with (none).
KNOWN_DISAGREEMENTS: set[str] = set()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            field.name,
            marks=pytest.mark.xfail(
                strict=True, reason="serve's option default differs from the setting's"
            )
            if field.name in KNOWN_DISAGREEMENTS
            else (),
        )
        for field in attrs.fields(ServerSettings)
    ],
)
def test_the_documented_default_is_the_one_that_applies(name: str) -> None:
    """The page shows ServerSettings' default; serve must run with the same one."""
    param = serve_params()[name]
    field = attrs.fields_dict(ServerSettings)[name]
    if not has_default(param.default):
        return  # no option default: build_settings or ServerSettings decides (listen, db)
    converted = param.type.convert(param.default, param, None)
    assert converted == field.default, (
        f"--{name.replace('_', '-')} defaults to {param.default!r}, the setting to {field.default!r}"
    )
