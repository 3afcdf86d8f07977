"""The import graph holds the architecture (DESIGN.md §1–§2, STYLE.md §1, §3).

* sansio_sip is pure: nothing in it imports a socket, an event loop, a thread,
  the clock, randomness, the file system, a subprocess or the application's
  libraries, at module level or inside a function, statically or through
  ``__import__``/``importlib``. It imports only the standard library and attrs.
* The drivers (io_anyio, io_socket) import neither each other, nor the
  application (kx_sipd), nor the relay: they are handed those as objects.
* rtp_relay runs without either driver and without the application.
* Nothing outside sansio_sip reaches into its private modules from the
  packages: what ``sansio_sip/__init__.py`` exports is the whole API.

Every check reads the source with ``ast``; nothing is imported, so a
forbidden import cannot hide behind a failing import or a lazy branch.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The list (issue 6), the brief's additions, and the rest of the
# standard library's ways to reach the outside world from the core.
FORBIDDEN_IN_CORE = frozenset(
    {
        # issue 6: "socket, asyncio, anyio, trio, selectors, threading, time or random"
        "socket",
        "asyncio",
        "anyio",
        "trio",
        "selectors",
        "threading",
        "time",
        "random",
        # the application's libraries and the rest of the I/O surface
        "sqlite3",
        "orjson",
        "click",
        "subprocess",
        "os",
        "multiprocessing",
        "concurrent",
        "signal",
        "select",
        "ssl",
        "http",
        "secrets",
        "uuid",
        "logging",
        "tempfile",
        "shutil",
        "pathlib",
        "importlib",
        "uvloop",
        "prometheus_client",
        # the other packages of this repository (dependencies point one way)
        "io_anyio",
        "io_socket",
        "rtp_relay",
        "kx_sipd",
    }
)
CORE_THIRD_PARTY = frozenset({"attrs", "attr"})


def python_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def imported_modules(source: str, *, package: str, module_path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, wherever it
    is (module level, function, class, try/except, TYPE_CHECKING), plus string
    arguments of ``__import__(...)`` and ``importlib.import_module(...)``."""
    tree = ast.parse(source, filename=str(module_path))
    relative_parts = module_path.relative_to(ROOT / package).with_suffix("").parts
    here = [package, *relative_parts[:-1]]  # the package holding this module (or __init__)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(here):
                    yield node.lineno, "<relative import above the package>"
                    continue
                prefix = ".".join(here[: len(here) - node.level + 1])
                if node.module:
                    yield node.lineno, f"{prefix}.{node.module}"
                else:
                    for alias in node.names:
                        yield node.lineno, f"{prefix}.{alias.name}"
            else:
                assert node.module is not None
                yield node.lineno, node.module
                for alias in node.names:
                    yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call):
            name = _dynamic_import_target(node)
            if name is not None:
                yield node.lineno, name


def _dynamic_import_target(node: ast.Call) -> str | None:
    func = node.func
    is_dunder = isinstance(func, ast.Name) and func.id == "__import__"
    is_importlib = isinstance(func, ast.Attribute) and func.attr == "import_module"
    if not (is_dunder or is_importlib):
        return None
    if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return "<dynamic import of a computed name>"


def top(name: str) -> str:
    return name.split(".", 1)[0]


def imports_of(package: str) -> list[tuple[str, int, str]]:
    """(file relative to the repo, line, module) for every import in ``package``."""
    found = []
    for path in python_files(package):
        source = path.read_text(encoding="utf-8")
        for line, name in imported_modules(source, package=package, module_path=path):
            found.append((str(path.relative_to(ROOT)), line, name))
    return found


def test_the_core_imports_nothing_that_does_io() -> None:
    offences = [
        f"{file}:{line}: imports {name}"
        for file, line, name in imports_of("sansio_sip")
        if top(name) in FORBIDDEN_IN_CORE or name.startswith("<")
    ]
    assert not offences, "sansio_sip must stay pure (DESIGN.md §2):\n" + "\n".join(offences)


def test_the_core_imports_only_the_standard_library_and_attrs() -> None:
    allowed = set(sys.stdlib_module_names) | CORE_THIRD_PARTY | {"sansio_sip", "__future__"}
    offences = [
        f"{file}:{line}: imports {name}"
        for file, line, name in imports_of("sansio_sip")
        if top(name) not in allowed
    ]
    assert not offences, "sansio_sip may import only stdlib and attrs:\n" + "\n".join(offences)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("io_anyio", {"io_socket", "kx_sipd", "rtp_relay"}),
        ("io_socket", {"io_anyio", "kx_sipd", "rtp_relay"}),
        ("rtp_relay", {"kx_sipd", "io_anyio", "io_socket"}),
    ],
)
def test_dependencies_point_one_way(package: str, forbidden: set[str]) -> None:
    offences = [
        f"{file}:{line}: imports {name}"
        for file, line, name in imports_of(package)
        if top(name) in forbidden
    ]
    assert not offences, f"{package} must not import {sorted(forbidden)}:\n" + "\n".join(offences)


@pytest.mark.parametrize("package", ["io_anyio", "io_socket", "rtp_relay", "kx_sipd"])
def test_packages_use_only_the_public_api_of_the_core(package: str) -> None:
    offences = [
        f"{file}:{line}: imports {name}"
        for file, line, name in imports_of(package)
        if top(name) == "sansio_sip" and any(part.startswith("_") for part in name.split(".")[1:2])
    ]
    assert not offences, (
        f"{package} reaches into private sansio_sip modules; use what sansio_sip exports:\n"
        + "\n".join(offences)
    )


# -- the checker itself must be able to fail ------------------------------------


CAUGHT = """
import attrs
from . import _message
from ._digest import compute_ha1

def later():
    import socket
    from time import monotonic
    return __import__("random"), importlib.import_module("os.path")

class Lazy:
    def method(self):
        try:
            import asyncio.events
        except ImportError:
            pass
"""


def test_the_checker_sees_every_form_of_import() -> None:
    path = ROOT / "sansio_sip" / "_example.py"
    found = {
        name for _line, name in imported_modules(CAUGHT, package="sansio_sip", module_path=path)
    }
    assert {"socket", "time", "random", "os.path", "asyncio.events"} <= found
    assert {"sansio_sip._message", "sansio_sip._digest", "attrs"} <= found
    flagged = {name for name in found if top(name) in FORBIDDEN_IN_CORE}
    assert flagged == {"socket", "time", "time.monotonic", "random", "os.path", "asyncio.events"}


def test_the_checker_resolves_relative_imports_in_subpackages() -> None:
    path = ROOT / "sansio_sip" / "sub" / "_mod.py"
    source = "from .. import _engine\nfrom ...x import y\n"
    found = [
        name for _line, name in imported_modules(source, package="sansio_sip", module_path=path)
    ]
    assert found == ["sansio_sip._engine", "<relative import above the package>"]
