"""Compiled decoding (Runtime.compile: batch-1 step forwards through torch.compile) gives the eager tokens.

Compiling costs seconds per step shape even on the tiny test model, so one module-scoped runtime compiles a
handful of shapes once and every test reuses them.
"""

from __future__ import annotations

import pytest

from builders import build_mostly_right
from mtp_runtime import load

PROMPT = [9, 9, 31, 2, 60, 12, 7]
DRAFTS = {"plain": dict(draft="none"), "chain2": dict(draft="chain", num_draft_tokens=2),
          "tree21": dict(draft="tree", tree="2,1"), "auto": dict(draft="auto", num_draft_tokens=2)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = build_mostly_right(tmp_path_factory.mktemp("compiled"), num_mtp=2, seed=3)
    compiled = load(folder, device="cpu", compile=True)
    return load(folder, device="cpu"), compiled


@pytest.mark.parametrize("name", list(DRAFTS))
def test_compiled_tokens_equal_eager(pair, name):
    eager, compiled = pair
    kwargs = dict(input_ids=PROMPT, max_new_tokens=24, ignore_eos=True, **DRAFTS[name])
    expected = eager.generate(**kwargs)
    got = compiled.generate(**kwargs)
    assert got.token_ids == expected.token_ids
    assert got.stats.accepted_length_histogram == expected.stats.accepted_length_histogram or name == "auto"
    assert compiled.forwards.compiled and compiled.forwards.compile_seconds > 0


def test_batches_stay_eager_and_equal(pair):
    eager, compiled = pair
    prompts = [PROMPT, [5, 6], [1, 2, 3]]
    kwargs = dict(input_ids=prompts, max_new_tokens=12, draft="chain", num_draft_tokens=2, ignore_eos=True)
    assert [r.token_ids for r in compiled.generate(**kwargs)] == [r.token_ids for r in eager.generate(**kwargs)]


def test_sampling_with_a_seed_matches_eager(pair):
    eager, compiled = pair
    kwargs = dict(input_ids=PROMPT, max_new_tokens=16, draft="chain", num_draft_tokens=2, temperature=0.9, seed=5)
    assert compiled.generate(**kwargs).token_ids == eager.generate(**kwargs).token_ids
