"""Tests that need a real program (baresip, linphonec, sipsak, sipp) from the OS packages.

On a developer's machine without the program such a test is skipped, saying which
package to install. Under CI (``CI=true``, as ``.ci/run`` is run) the same test
*fails*, naming the program: scripts/install-test-deps.sh must have installed it,
and a softphone test that quietly skipped would let CI stay green without ever
having placed a call (issue 8: "the softphone tests pass in CI on a fresh machine").
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

__all__ = ["in_ci", "requires"]

F = TypeVar("F", bound=Callable[..., Any])


def in_ci() -> bool:
    """True when the environment says this is a CI run (``CI=true``, ``CI=1``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def requires(program: str, found: object, install: str) -> Callable[[F], F]:
    """Decorate a test that runs ``program``; ``found`` is its path (None/empty: missing),
    ``install`` says how to get it. Skipped when missing, except under CI: failed."""

    def decorate(test: F) -> F:
        if found:
            return test
        reason = f"{program} is not installed ({install})"
        if not in_ci():
            marked: F = pytest.mark.skip(reason=reason)(test)
            return marked

        def missing(*args: Any, **kwargs: Any) -> None:
            pytest.fail(f"{reason}: under CI the interop tests must run, not skip", pytrace=False)

        # The test's name, marks and parametrized arguments, but none of its fixtures:
        # failing must not first start the servers and clients the test would have used.
        marks = list(getattr(test, "pytestmark", []))
        parametrized = {
            name for mark in marks if mark.name == "parametrize" for name in _names(mark)
        }
        signature = inspect.signature(test)
        missing.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for p in signature.parameters.values() if p.name in parametrized]
        )
        for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(missing, attribute, getattr(test, attribute))
        missing.pytestmark = marks  # type: ignore[attr-defined]
        return missing  # type: ignore[return-value]

    return decorate


def _names(mark: Any) -> list[str]:
    names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
    if isinstance(names, str):
        return [name.strip() for name in names.split(",")]
    return list(names)
