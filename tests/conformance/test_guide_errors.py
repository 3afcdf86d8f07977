"""The guide's §9 table, row by row: each row names the conformance tests that make it true.

The rows are read from the customer's guide itself (shared/spec), so a row added to
the guide, or a reason phrase changed there, fails here until a test answers for it;
a covering test renamed or removed fails here too. Each named test asserts the row's
exact status line over the wire, once per driver; this check reads files only, so it
is not parametrized over the drivers.

Row 408 of the guide reads "Server did not receive your packet": a client's own
timeout. What the server itself answers 408 for is a carrier that never answers
(Timer B), which is what the named test checks.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import test_calls
import test_register_options

GUIDE = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "spec"
    / "sip-client-authenticated-connection.md"
)

COVERED = {
    "401 Unauthorized": [
        "test_register_options.test_register_without_credentials_is_challenged",
        "test_calls.test_answered_call_client_hangs_up",
    ],
    "403 Unknown user": [
        "test_register_options.test_unknown_or_suspended_user_is_403_unknown_user",
        "test_calls.test_unknown_or_suspended_user_on_invite_is_403_unknown_user",
    ],
    "403 Bad credentials": [
        "test_register_options.test_wrong_password_is_403_bad_credentials",
        "test_register_options.test_credentials_for_another_realm_are_bad_credentials",
        "test_calls.test_wrong_password_on_invite_is_403_bad_credentials",
    ],
    "405 Method Not Allowed": [
        "test_register_options.test_other_methods_are_405_with_allow",
    ],
    "408 Request Timeout": [
        "test_calls.test_silent_carrier_is_408_after_timer_b",
    ],
    "503 Service Unavailable": [
        "test_register_options.test_store_failure_is_503_with_retry_after_then_recovers",
        "test_calls.test_store_failure_on_invite_is_503_then_recovers",
    ],
}

MODULES = {"test_calls": test_calls, "test_register_options": test_register_options}


def guide_rows() -> list[str]:
    """The first column of the guide's §9 table ("401 Unauthorized", ...)."""
    text = GUIDE.read_text()
    section = text.split("## 9.", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| (\d{3} [^|]*?) \|", section, flags=re.MULTILINE)


def test_the_guide_table_is_read() -> None:
    rows = guide_rows()
    assert len(rows) >= 6, rows
    assert "401 Unauthorized" in rows


def test_every_row_of_the_guide_has_covering_tests() -> None:
    assert sorted(guide_rows()) == sorted(COVERED)


@pytest.mark.parametrize("row", sorted(COVERED))
def test_the_covering_tests_exist_and_name_the_status_line(row: str) -> None:
    code, reason = row.split(" ", 1)
    for name in COVERED[row]:
        module, _, function = name.partition(".")
        test = getattr(MODULES[module], function, None)
        assert callable(test), f"{name} (covering guide §9 '{row}') is gone"
        # The test itself checks this very code and phrase.
        source = inspect.getsource(test)
        assert code in source and f'{reason}"' in source, (name, row)
