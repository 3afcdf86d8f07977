"""The atheris harnesses fuzz/fuzz_sdp.py and fuzz/fuzz_digest.py, run briefly
under hypothesis in normal CI (STYLE §9): their seeds hold the invariant, and
so do random and mutated inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_harness_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SDP = load("fuzz_sdp")
DIGEST = load("fuzz_digest")
SDP_SEEDS: list[bytes] = SDP.seeds()
DIGEST_SEEDS: list[bytes] = DIGEST.seeds()


def test_seed_corpora_come_from_the_vectors_and_captures() -> None:
    assert len(SDP_SEEDS) >= 15
    assert any(b"pjmedia" in seed for seed in SDP_SEEDS)  # a softphone capture
    assert len(DIGEST_SEEDS) >= 9
    assert any(b"twolmsted" in seed for seed in DIGEST_SEEDS)  # the Ekiga capture


@pytest.mark.parametrize("harness", [SDP, DIGEST], ids=["sdp", "digest"])
def test_seeds_hold_the_invariant(harness: ModuleType) -> None:
    for seed in harness.seeds():
        harness.check(seed)


@pytest.mark.parametrize("harness", [SDP, DIGEST], ids=["sdp", "digest"])
def test_write_seeds(harness: ModuleType, tmp_path: Path) -> None:
    harness.write_seeds(tmp_path / "corpus")
    written = sorted((tmp_path / "corpus").iterdir())
    assert [p.read_bytes() for p in written] == harness.seeds()


def test_check_reports_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not vacuous: a serialiser that drops a line is caught."""
    monkeypatch.setattr(SDP, "serialize_sdp", lambda sd: b"v=0\r\no=- 1 1 IN IP4 h\r\n")
    with pytest.raises(AssertionError):
        SDP.check(SDP_SEEDS[0])


def _mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with a slice replaced by random bytes: close enough to valid
    input to reach deep into the parsers."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        seed = draw(st.sampled_from(seeds))
        start = draw(st.integers(0, len(seed)))
        end = draw(st.integers(start, min(len(seed), start + 8)))
        filler = draw(
            st.one_of(
                st.binary(max_size=8),
                st.sampled_from([b"\r\n", b"\n", b" ", b"=", b",", b'"', b"\\", b"/", b":", b"0"]),
            )
        )
        return seed[:start] + filler + seed[end:]

    return mutate()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400), _mutations(SDP_SEEDS)))
def test_sdp_harness_invariant(data: bytes) -> None:
    SDP.check(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), _mutations(DIGEST_SEEDS)))
def test_digest_harness_invariant(data: bytes) -> None:
    DIGEST.check(data)
