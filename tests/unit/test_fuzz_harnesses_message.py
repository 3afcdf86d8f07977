"""The message-layer fuzz harnesses, run briefly so CI exercises them.

Each harness's ``one_input`` (fuzz/fuzz_message.py, fuzz_framer.py,
fuzz_uri.py) runs over its whole seed corpus, derived from ../shared/testdata
by fuzz/make_seeds.py, and then under hypothesis on random and mutated
inputs. The invariant is each harness's own: parse or raise ParseError.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

make_seeds = importlib.import_module("make_seeds")
HARNESSES = {kind: importlib.import_module(f"fuzz_{kind}") for kind in ("message", "framer", "uri")}


def _seeds(kind: str) -> list[bytes]:
    seeds = make_seeds.seed_inputs(kind)
    if kind == "framer":
        seeds = [bytes([step]) + s for s in seeds for step in (0, 4, 16)]
    return seeds


@pytest.mark.parametrize("kind", sorted(HARNESSES))
def test_seed_corpus_holds_the_invariant(kind: str) -> None:
    seeds = _seeds(kind)
    assert len(seeds) > 10
    for seed in seeds:
        HARNESSES[kind].one_input(seed)


@st.composite
def mutated_seed(draw: st.DrawFn, kind: str) -> bytes:
    seeds = _seeds(kind)
    seed = draw(st.sampled_from(seeds))
    at = draw(st.integers(0, len(seed)))
    cut = draw(st.integers(0, 8))
    return seed[:at] + draw(st.binary(max_size=6)) + seed[at + cut :]


def _harness(kind: str) -> ModuleType:
    return HARNESSES[kind]


@pytest.mark.parametrize("kind", sorted(HARNESSES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_and_mutated_inputs(kind: str, data: st.DataObject) -> None:
    one_input = _harness(kind).one_input
    one_input(data.draw(st.binary(max_size=200), label="random"))
    one_input(data.draw(mutated_seed(kind), label="mutated"))
