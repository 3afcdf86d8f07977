"""docs/api.md documents the whole public API of sansio_sip (issue 6 §4).

The page is written by hand; this test keeps it honest: every name in
``sansio_sip.__all__`` has a row, every row names something that exists, the
Engine's method signatures on the page are the code's, and every exported
class and function, and every public method and property of an exported
class, carries a docstring of its own.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import sansio_sip

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)


def documented() -> list[str]:
    """The first cell of every table row whose first cell is code."""
    return ROW.findall(PAGE.read_text(encoding="utf-8"))


def engine_members() -> dict[str, object]:
    return {
        name: value for name, value in vars(sansio_sip.Engine).items() if not name.startswith("_")
    }


def render_signature(name: str, function: object) -> str:
    """``name(a, b, *, c, d=None)``: parameter names, kinds and defaults, no annotations."""
    parts: list[str] = []
    star_written = False
    for parameter in list(inspect.signature(function).parameters.values())[1:]:  # not self
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not star_written:
            parts.append("*")
            star_written = True
        text = parameter.name
        if parameter.default is not inspect.Parameter.empty:
            text += f"={parameter.default!r}"
        parts.append(text)
    return f"{name}({', '.join(parts)})"


def test_every_export_is_documented() -> None:
    rows = set(documented())
    missing = [name for name in sansio_sip.__all__ if name not in rows]
    assert not missing, (
        f"exported from sansio_sip but missing from docs/api.md: {missing}; add a row "
        "(name and a line from its docstring) to the right group"
    )


def test_the_page_names_only_what_exists() -> None:
    exported = set(sansio_sip.__all__)
    members = engine_members()
    unknown = []
    for cell in documented():
        name = cell.split("(", 1)[0]
        if name not in exported and name not in members:
            unknown.append(cell)
    assert not unknown, f"docs/api.md documents names sansio_sip does not export: {unknown}"


def test_every_public_engine_member_is_documented_with_its_signature() -> None:
    cells = documented()
    for name, value in engine_members().items():
        if isinstance(value, property):
            assert name in cells, f"Engine.{name} is missing from docs/api.md"
            continue
        expected = render_signature(name, value)
        on_page = [cell for cell in cells if cell.split("(", 1)[0] == name]
        assert on_page == [expected], (
            f"docs/api.md shows Engine.{name} as {on_page}, the code has {expected!r}"
        )


# Exported without a docstring of their own; requests-docs.md asks their owner for one.
# When one gets its docstring, the test below fails until the name is removed here.
KNOWN_WITHOUT_DOCSTRING: set[str] = set()


def test_every_exported_class_and_function_has_a_docstring() -> None:
    undocumented = []
    for name in sansio_sip.__all__:
        value = getattr(sansio_sip, name)
        if inspect.isclass(value):
            doc = value.__dict__.get("__doc__")
        elif inspect.isfunction(value):
            doc = value.__doc__
        else:
            continue  # constants and type aliases: documented at their definition and here
        if not (doc and doc.strip()):
            undocumented.append(name)
    assert set(undocumented) == KNOWN_WITHOUT_DOCSTRING, (
        f"exported without a docstring: {sorted(set(undocumented) - KNOWN_WITHOUT_DOCSTRING)}; "
        f"documented now, remove from KNOWN_WITHOUT_DOCSTRING: "
        f"{sorted(KNOWN_WITHOUT_DOCSTRING - set(undocumented))}"
    )
    for name, value in engine_members().items():
        assert inspect.getdoc(value), f"Engine.{name} has no docstring"


def public_members(cls: type) -> dict[str, object]:
    """The public methods and properties a class defines itself (not inherited, not
    attrs' generated ones, not enum members)."""
    members = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        function = value.fget if isinstance(value, property) else value
        if isinstance(function, staticmethod | classmethod):
            function = function.__func__
        if inspect.isfunction(function):
            members[name] = function
    return members


def test_every_public_method_and_property_of_an_exported_class_has_a_docstring() -> None:
    undocumented = [
        f"{name}.{member}"
        for name in sansio_sip.__all__
        if inspect.isclass(getattr(sansio_sip, name))
        for member, function in public_members(getattr(sansio_sip, name)).items()
        if not inspect.getdoc(function)
    ]
    assert not undocumented, f"public members without a docstring: {undocumented}"


def test_the_member_check_sees_methods_and_properties() -> None:
    class Sample:
        def method(self) -> None:
            pass

        @property
        def value(self) -> int:
            return 1

        def _private(self) -> None:
            pass

    assert sorted(public_members(Sample)) == ["method", "value"]
    assert not any(inspect.getdoc(f) for f in public_members(Sample).values())


def test_the_public_api_is_well_formed() -> None:
    assert len(sansio_sip.__all__) == len(set(sansio_sip.__all__)), "duplicates in __all__"
    for name in sansio_sip.__all__:
        assert hasattr(sansio_sip, name), f"__all__ names {name}, which sansio_sip lacks"


def test_the_signature_renderer_sees_kinds_and_defaults() -> None:
    def sample(self: object, a: int, *, b: str, c: int | None = None) -> None:
        """A stand-in with every parameter kind the engine uses."""

    assert render_signature("sample", sample) == "sample(a, *, b, c=None)"
