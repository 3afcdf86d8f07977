"""The README keeps what the CI relies on and says only true things about the tree.

Its first code block is the two set-up commands, exactly; .ci/run runs the
second one; every path in its layout table and every script it shows exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETUP = [
    "pip install -e . && kx-sipd serve --demo",
    "bash scripts/install-test-deps.sh && python3 -m pytest",
]


def test_the_first_code_block_is_the_two_setup_commands() -> None:
    first = re.search(r"^```[a-z]*\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    assert first is not None
    assert first.group(1).splitlines() == SETUP


def test_the_ci_runs_the_readmes_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert SETUP[1] in ci.splitlines()


def test_the_layout_names_existing_paths() -> None:
    rows = re.findall(r"^\| `([^`]+/)` \|", README, re.MULTILINE)
    assert {"sansio_sip/", "kx_sipd/", "docs/", "examples/"} <= set(rows)
    for path in rows:
        assert (ROOT / path).is_dir(), path


def test_the_scripts_shown_exist() -> None:
    scripts = re.findall(r"python3 ((?:bench|examples|fuzz)/\S+\.py)", README)
    assert scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script


def test_the_readme_points_at_every_guide() -> None:
    for page in ("operator-guide", "integrator-guide", "api", "config-reference", "embedding"):
        assert f"(docs/{page}.md)" in README, page
