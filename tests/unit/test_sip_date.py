"""The engine's Date header (RFC 3261 §20.17), formatted without the clock or
email.utils: it must agree with email.utils.formatdate(usegmt=True) everywhere."""

from __future__ import annotations

import email.utils

from hypothesis import given
from hypothesis import strategies as st

from sansio_sip._engine import _format_sip_date

# Leap days, century rules (1900 is not a leap year, 2000 and 2400 are), year ends.
EDGES = [
    0,
    86399,
    86400,
    951782399,  # 2000-02-28 23:59:59
    951782400,  # 2000-02-29 (leap: divisible by 400)
    951868800,  # 2000-03-01
    4107456000,  # 2100-03-01 (2100 is not a leap year)
    13574563200,  # 2400-02-29
    253402300799,  # 9999-12-31 23:59:59
]


def test_edges_match_the_standard_library() -> None:
    for second in EDGES:
        assert _format_sip_date(second) == email.utils.formatdate(second, usegmt=True)


def test_a_known_date() -> None:
    assert _format_sip_date(1795719418) == "Thu, 26 Nov 2026 18:56:58 GMT"


@given(st.integers(min_value=0, max_value=253402300799))
def test_any_second_matches_the_standard_library(second: int) -> None:
    assert _format_sip_date(second) == email.utils.formatdate(second, usegmt=True)
