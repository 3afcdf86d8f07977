"""kx_sipd.logging: JSON lines, the level filter, odd values."""

from __future__ import annotations

import io
import re

import orjson
import pytest

from kx_sipd.logging import JsonLogger
from sansio_sip import Log


def test_entries_at_or_above_the_level_are_one_json_object_per_line() -> None:
    stream = io.BytesIO()
    log = JsonLogger("info", stream)
    log(Log(level="debug", event="engine.detail"))
    log(Log(level="info", event="transaction.answered", fields=(("status", 200), ("peer", "a"))))
    log.log("error", "server.failed", error="boom", path=None)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (orjson.loads(line) for line in lines)
    assert first["event"] == "transaction.answered" and first["level"] == "info"
    assert first["fields"] == {"status": 200, "peer": "a"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["fields"] == {"error": "boom", "path": None}


def test_values_orjson_does_not_know_are_logged_as_text() -> None:
    stream = io.BytesIO()
    JsonLogger("debug", stream).log("info", "x", value=ValueError("odd"), raw=b"\xff")
    fields = orjson.loads(stream.getvalue())["fields"]
    assert fields["value"] == "odd" and fields["raw"] == "b'\\xff'"


def test_unknown_level_is_refused_and_a_closed_stream_is_survived() -> None:
    with pytest.raises(ValueError):
        JsonLogger("loud")
    stream = io.BytesIO()
    log = JsonLogger("debug", stream)
    stream.close()
    log.log("info", "after-close")  # must not raise
    assert log.enabled("error") and not JsonLogger("warning").enabled("info")
