"""Render the transaction layer's transition table as Markdown and Mermaid.

The table in ``sansio_sip/_transaction.py`` is the single source of truth for
the four RFC 3261 §17 machines; this script turns it into the generated part
of ``docs/transactions.md`` (the h2 ``visualizer`` habit: diagrams come from
the table, outside the package).

    python3 tools/render_tables.py            # rewrite docs/transactions.md
    python3 tools/render_tables.py --check    # exit 1 if the page is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sansio_sip._timers import TimerName  # noqa: E402
from sansio_sip._transaction import _INITIAL_STATE, _TRANSITIONS, Machine  # noqa: E402

DOC = ROOT / "docs" / "transactions.md"
BEGIN = "<!-- BEGIN GENERATED: tools/render_tables.py -->"
END = "<!-- END GENERATED -->"

_FIGURES = {
    Machine.INVITE_CLIENT: "RFC 3261 Figure 5 + RFC 6026 §7.2",
    Machine.NON_INVITE_CLIENT: "RFC 3261 Figure 6",
    Machine.INVITE_SERVER: "RFC 3261 Figure 7 + RFC 6026 §7.1",
    Machine.NON_INVITE_SERVER: "RFC 3261 Figure 8",
}


def _input_label(kind: object) -> str:
    if isinstance(kind, TimerName):
        return f"Timer {kind.value}"
    return str(getattr(kind, "value", kind))


def render() -> str:
    """The generated section: one diagram and one table per machine."""
    parts: list[str] = [BEGIN, ""]
    for machine in Machine:
        rows = [
            (state, kind, target, effect)
            for (m, state, kind), (target, effect) in _TRANSITIONS.items()
            if m is machine
        ]
        parts.append(f"### {machine.value} ({_FIGURES[machine]})")
        parts.append("")
        parts.append("```mermaid")
        parts.append("stateDiagram-v2")
        parts.append(f"    [*] --> {_INITIAL_STATE[machine].value}")
        for state, kind, target, effect in rows:
            end = "[*]" if target.value == "Terminated" else target.value
            parts.append(f"    {state.value} --> {end} : {_input_label(kind)} / {effect.value}")
        parts.append("```")
        parts.append("")
        parts.append("| State | Input | Next state | Effect |")
        parts.append("| --- | --- | --- | --- |")
        for state, kind, target, effect in rows:
            parts.append(
                f"| {state.value} | {_input_label(kind)} | {target.value} | {effect.value} |"
            )
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def updated_page(page: str) -> str:
    """``page`` with its generated section replaced by a fresh rendering."""
    head, _sep, rest = page.partition(BEGIN)
    _old, _sep, tail = rest.partition(END)
    return head + render() + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    args = parser.parse_args(argv)
    page = DOC.read_text(encoding="utf-8")
    if BEGIN not in page or END not in page:
        print(f"{DOC}: generated-section markers missing", file=sys.stderr)
        return 1
    fresh = updated_page(page)
    if args.check:
        if fresh != page:
            print(f"{DOC} is stale: run python3 tools/render_tables.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
