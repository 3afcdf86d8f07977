"""tests/interop/softphones/required.py: a test that needs a missing program is
skipped on a developer's machine and fails under CI (issue 8: the softphone tests
must run in CI on a fresh machine, never skip there unnoticed)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from interop.softphones.required import in_ci, requires

REPO = Path(__file__).resolve().parents[2]


def _probe(value: list[str]) -> None:
    value.append("ran")


def test_a_present_program_leaves_the_test_alone() -> None:
    assert requires("sh", "/bin/sh", "always there")(_probe) is _probe


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("", False), ("0", False)])
def test_ci_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, ci: bool
) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_missing_outside_ci_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    test = requires("nosuchphone", None, "apt-get install nosuchphone")(_probe)
    [mark] = test.pytestmark  # type: ignore[attr-defined]
    assert mark.name == "skip" and "nosuchphone" in mark.kwargs["reason"]


def test_missing_under_ci_is_a_failure_naming_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    test = requires("nosuchphone", None, "apt-get install nosuchphone")(_probe)
    ran: list[str] = []
    with pytest.raises(pytest.fail.Exception, match="nosuchphone is not installed"):
        test(ran)
    assert ran == []


@pytest.mark.parametrize("ci", ["true", ""])
def test_the_softphone_tests_fail_under_ci_when_the_clients_are_missing(
    tmp_path: Path, ci: str
) -> None:
    """The real module, run with a PATH that has python but no softphone nor sipp:
    under CI=true every test fails (none is skipped), otherwise all are skipped. No
    server is started either way (a failing test asks for none of its fixtures)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/interop/test_softphone_clients.py",
        ],
        cwd=REPO,
        env={"PATH": str(bin_dir), "CI": ci, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout
    if ci:
        assert result.returncode == 1, out
        assert "is not installed" in out and "9 failed" in out, out
        assert "skipped" not in out, out
    else:
        assert result.returncode == 0 and "9 skipped" in out, out
        assert "failed" not in out, out


def test_a_parametrized_test_keeps_its_parameters_but_not_its_fixtures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")

    @pytest.mark.parametrize("driver", ["a", "b"])
    def test_x(tmp_path: Path, driver: str) -> None:
        raise AssertionError("never runs")

    failing = requires("nosuchphone", None, "-")(test_x)
    assert list(inspect.signature(failing).parameters) == ["driver"]
    assert [mark.name for mark in failing.pytestmark] == ["parametrize"]  # type: ignore[attr-defined]
    assert failing.__name__ == "test_x"
    with pytest.raises(pytest.fail.Exception):
        failing(driver="a")
