"""The import graph holds the architecture (DESIGN.md §1–§2, STYLE.md §1, §3).

* sansio_sip is pure: nothing in it imports a socket, an event loop, a thread,
  the clock, randomness, the file system, a subprocess or the application's
  libraries, at module level or inside a function, statically or through
  ``__import__``/``importlib``/``builtins``/``sys.modules``/``exec``. It
  imports only the standard library and attrs.
* Nor does it reach them through the standard library: the stdlib modules it
  imports are loaded in a fresh interpreter, one by one, and none may load a
  forbidden module that attrs does not load already (the one exception is
  listed, with why, in ``KNOWN_TRANSITIVE``).
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
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
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
        "builtins",
        "pkgutil",
        "runpy",
        "imp",
        "zipimport",
        "ctypes",
        "mmap",
        "fcntl",
        "faulthandler",
        "_socket",
        "_thread",
        "_asyncio",
        "_random",
        "_posixsubprocess",
        "posix",
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


# Names that import, or run code that may import, without an import statement.
DYNAMIC_IMPORTERS = frozenset({"__import__", "exec", "eval", "compile", "__builtins__"})


def python_files(package: str, root: Path = ROOT) -> list[Path]:
    files = sorted((root / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def imported_modules(
    source: str, *, package: str, module_path: Path, root: Path = ROOT
) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, wherever it
    is (module level, function, class, try/except, TYPE_CHECKING), plus string
    arguments of ``__import__(...)`` and ``importlib.import_module(...)``; any
    other way to import (``__import__`` not called with a constant, ``exec``,
    ``eval``, ``compile``, ``__builtins__``, ``sys.modules``) is reported as
    ``<dynamic import ...>``."""
    tree = ast.parse(source, filename=str(module_path))
    relative_parts = module_path.relative_to(root / package).with_suffix("").parts
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
            elif isinstance(node.func, ast.Name) and node.func.id in DYNAMIC_IMPORTERS:
                yield node.lineno, f"<dynamic import through {node.func.id}()>"
        elif isinstance(node, ast.Name) and node.id in DYNAMIC_IMPORTERS:
            if not _is_called(tree, node):
                yield node.lineno, f"<dynamic import through {node.id}>"
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "modules"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            yield node.lineno, "<dynamic import through sys.modules>"


def _is_called(tree: ast.AST, name: ast.Name) -> bool:
    """Whether ``name`` is the function of a call (reported with the call itself)."""
    return any(isinstance(node, ast.Call) and node.func is name for node in ast.walk(tree))


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


def imports_of(package: str, root: Path = ROOT) -> list[tuple[str, int, str]]:
    """(file relative to ``root``, line, module) for every import in ``package``."""
    found = []
    for path in python_files(package, root):
        source = path.read_text(encoding="utf-8")
        for line, name in imported_modules(source, package=package, module_path=path, root=root):
            found.append((str(path.relative_to(root)), line, name))
    return found


def core_offences(root: Path = ROOT) -> list[str]:
    """Every forbidden import in ``root``/sansio_sip, as "file:line: imports name"."""
    return [
        f"{file}:{line}: imports {name}"
        for file, line, name in imports_of("sansio_sip", root)
        if top(name) in FORBIDDEN_IN_CORE or name.startswith("<")
    ]


def test_the_core_imports_nothing_that_does_io() -> None:
    offences = core_offences()
    assert not offences, "sansio_sip must stay pure (DESIGN.md §2):\n" + "\n".join(offences)


def test_the_core_imports_only_the_standard_library_and_attrs() -> None:
    allowed = set(sys.stdlib_module_names) | CORE_THIRD_PARTY | {"sansio_sip", "__future__"}
    offences = [
        f"{file}:{line}: imports {name}"
        for file, line, name in imports_of("sansio_sip")
        if top(name) not in allowed
    ]
    assert not offences, "sansio_sip may import only stdlib and attrs:\n" + "\n".join(offences)


# -- what the core's standard-library imports load in turn -----------------------

# The list and the rest of the I/O surface, as loaded modules. ``time`` is
# loaded by the interpreter itself before any import (a built-in module), so only
# the direct check above can see it; attrs loads ``os`` and ``threading`` itself.
TRANSITIVE_FORBIDDEN = frozenset(
    {
        "socket",
        "_socket",
        "select",
        "selectors",
        "asyncio",
        "anyio",
        "trio",
        "threading",
        "_thread",
        "random",
        "subprocess",
        "signal",
        "ssl",
        "sqlite3",
        "multiprocessing",
        "concurrent",
        "urllib.request",
        "http.client",
    }
)

KNOWN_TRANSITIVE: dict[str, frozenset[str]] = {
    # A stdlib module the core needs that loads an I/O module it never calls would be
    # listed here with why. None today: the engine formats its Date header itself
    # rather than with email.utils, which loads socket and random.
}


def stdlib_imports_of_core(root: Path = ROOT) -> list[str]:
    """The standard-library modules sansio_sip imports (``from a import b``: a, and
    a.b when that is a module)."""
    names = set()
    for _file, _line, name in imports_of("sansio_sip", root):
        if top(name) in sys.stdlib_module_names and not name.startswith("<"):
            try:
                if importlib.util.find_spec(name) is not None:
                    names.add(name)
            except (ImportError, ValueError):  # "a.b" where b is a function, not a module
                pass
    return sorted(names)


_LOADED = """
import json, sys
sys.path[:0] = {path!r}
import attrs
before = set(sys.modules)
__import__({module!r})
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def forbidden_loaded_by(modules: list[str]) -> dict[str, set[str]]:
    """For each module: the forbidden modules importing it loads, in a fresh
    interpreter (no site, no environment) that has imported attrs already."""
    path = [str(ROOT), str(Path(attrs.__file__).resolve().parents[1])]
    running = {
        module: subprocess.Popen(
            [sys.executable, "-S", "-E", "-c", _LOADED.format(path=path, module=module)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in modules
    }
    found = {}
    for module, process in running.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, f"importing {module}: {err}"
        loaded = set(json.loads(out))
        # Named as listed: "asyncio" for asyncio.events, "urllib.request" as it is.
        flagged = {top(name) if top(name) in TRANSITIVE_FORBIDDEN else name for name in loaded}
        flagged &= TRANSITIVE_FORBIDDEN
        if flagged:
            found[module] = flagged
    return found


def test_the_cores_standard_library_imports_load_nothing_that_does_io() -> None:
    modules = stdlib_imports_of_core()
    assert "hashlib" in modules and "re" in modules, modules  # the list is really read
    found = forbidden_loaded_by(modules)
    unexpected = {
        module: sorted(names - KNOWN_TRANSITIVE.get(module, frozenset()))
        for module, names in found.items()
        if names - KNOWN_TRANSITIVE.get(module, frozenset())
    }
    assert not unexpected, (
        "a standard-library module sansio_sip imports loads I/O modules:\n"
        + "\n".join(f"{module}: {names}" for module, names in sorted(unexpected.items()))
    )
    stale = sorted(set(KNOWN_TRANSITIVE) - set(found))
    assert not stale, f"KNOWN_TRANSITIVE lists {stale}, which the core no longer loads: drop it"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("io_anyio", {"io_socket", "kx_sipd", "rtp_relay"}),
        # issue 6: "blocking sockets and selectors, no asyncio"
        ("io_socket", {"io_anyio", "kx_sipd", "rtp_relay", "asyncio", "anyio", "trio", "uvloop"}),
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


def test_the_transitive_check_sees_socket_behind_a_harmless_looking_module() -> None:
    # smtplib imports socket; so does email.utils (for make_msgid), and random too,
    # which is why the engine no longer formats its Date header with it.
    found = forbidden_loaded_by(["smtplib", "email.utils", "hashlib"])
    assert "socket" in found["smtplib"]
    assert {"socket", "random"} <= found["email.utils"]
    assert "hashlib" not in found


# -- a synthetic core with a forbidden import added: the checks must fail ---------


ADDED = {
    "import socket": "socket",
    "from time import monotonic": "time",
    "import asyncio.events": "asyncio.events",
    "def later():\n    import threading\n": "threading",
    "import random as chance": "random",
    "from selectors import DefaultSelector": "selectors",
    "x = __import__('anyio')": "anyio",
    "import importlib\nx = importlib.import_module('trio')": "trio",
    "name = 'so' + 'cket'\nx = __import__(name)": "<dynamic import of a computed name>",
    "load = __import__\nx = load('socket')": "<dynamic import through __import__>",
    "import builtins\nx = builtins.__import__('socket')": "builtins",
    "import sys\nx = sys.modules['socket']": "<dynamic import through sys.modules>",
    "exec('import socket')": "<dynamic import through exec()>",
    "x = eval('1')": "<dynamic import through eval()>",
    "x = __builtins__": "<dynamic import through __builtins__>",
}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of sansio_sip (clean, as checked below) to add a module to."""
    root = tmp_path_factory.mktemp("synthetic")
    shutil.copytree(
        ROOT / "sansio_sip", root / "sansio_sip", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root


def test_the_synthetic_copy_of_the_core_is_clean(synthetic_root: Path) -> None:
    assert core_offences(synthetic_root) == []


@pytest.mark.parametrize("source", sorted(ADDED))
def test_a_forbidden_import_added_to_the_core_fails_the_check(
    synthetic_root: Path, source: str
) -> None:
    added = synthetic_root / "sansio_sip" / "_added.py"
    added.write_text(f'"""Added by the test."""\n\n{source}\n', encoding="utf-8")
    try:
        offences = core_offences(synthetic_root)
    finally:
        added.unlink()
    assert offences, source
    assert all(offence.startswith("sansio_sip/_added.py:") for offence in offences), offences
    assert any(offence.endswith(f"imports {ADDED[source]}") for offence in offences), offences


def test_a_stdlib_module_that_loads_socket_added_to_the_core_fails_the_check(
    synthetic_root: Path,
) -> None:
    added = synthetic_root / "sansio_sip" / "_added.py"
    added.write_text('"""Added by the test."""\n\nimport smtplib\n', encoding="utf-8")
    try:
        modules = stdlib_imports_of_core(synthetic_root)
    finally:
        added.unlink()
    assert "smtplib" in modules
    assert "socket" in forbidden_loaded_by(modules)["smtplib"]
