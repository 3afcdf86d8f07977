"""docs/transactions.md shows the transition table as it is in the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sansio_sip._transaction import _TRANSITIONS

ROOT = Path(__file__).resolve().parents[2]


def test_generated_tables_are_current() -> None:
    spec = importlib.util.spec_from_file_location(
        "render_tables", ROOT / "tools" / "render_tables.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "docs" / "transactions.md").read_text(encoding="utf-8")
    assert module.updated_page(page) == page, "run python3 tools/render_tables.py"
    # Every row of the table made it onto the page.
    generated = page.split("BEGIN GENERATED", 1)[1]
    assert generated.count("stateDiagram-v2") == 4
    rows = [line for line in generated.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 * 4 + len(_TRANSITIONS)  # header and rule rows per machine
