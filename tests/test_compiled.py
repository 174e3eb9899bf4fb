"""Compiled decoding (Runtime.compile: batch-1 step forwards through compiled step graphs) gives the eager
tokens; saved graphs load in a new runtime with the same tokens; a graph whose guards fail is compiled afresh and
saved beside the first; a graph checks its guards on its first calls per cache.

Compiling costs seconds per step shape even on the tiny test model, so one module-scoped runtime compiles a
handful of shapes once and every test reuses them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builders import build_mostly_right
from mtp_runtime import load
from mtp_runtime.cache import LatentCache
from mtp_runtime.compiled import GUARD_CHECKS, SAVED_VARIANTS, StepGraph
from mtp_runtime.model.plan import AttentionPlan, causal_visibility

PROMPT = [9, 9, 31, 2, 60, 12, 7]
DRAFTS = {"plain": dict(draft="none"), "chain2": dict(draft="chain", num_draft_tokens=2),
          "tree21": dict(draft="tree", tree="2,1"), "auto": dict(draft="auto", num_draft_tokens=2)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_mostly_right(tmp_path_factory.mktemp("compiled"), num_mtp=2, seed=3)


@pytest.fixture(scope="module")
def pair(folder):
    return load(folder, device="cpu"), load(folder, device="cpu", compile=True)


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


def test_saved_graphs_load_in_a_new_runtime_and_broken_files_compile_again(folder, tmp_path):
    kwargs = dict(input_ids=PROMPT, max_new_tokens=12, draft="chain", num_draft_tokens=2, ignore_eos=True)
    expected = load(folder, device="cpu").generate(**kwargs).token_ids

    def compiled_runtime():
        runtime = load(folder, device="cpu")
        runtime.compile(cache_dir=tmp_path)
        assert runtime.generate(**kwargs).token_ids == expected
        return runtime.forwards

    first = compiled_runtime()
    saved = sorted(tmp_path.glob("*.graph"))
    assert first.graphs_loaded == 0 and len(saved) == first.graphs_built > 0
    second = compiled_runtime()
    assert second.graphs_built == 0 and second.graphs_loaded == first.graphs_built
    for path in saved:
        path.write_bytes(b"not a graph")
    third = compiled_runtime()
    assert third.graphs_loaded == 0 and third.graphs_built == first.graphs_built
    assert all(path.stat().st_size > 100 for path in saved)  # compiled and saved again


def test_inputs_that_break_a_graphs_guards_compile_afresh_and_stay_right(pair):
    _, compiled = pair
    forwards = compiled.forwards
    model = compiled.model
    plan = _one_token_plan(model.config)
    tokens = torch.tensor([[7]])
    with torch.inference_mode():
        expected = model.logits(model.forward_trunk(tokens, plan))
        assert torch.allclose(forwards.trunk(tokens, plan)[1], expected, atol=1e-5)
        found = forwards.graphs_built + forwards.graphs_loaded
        int32 = forwards.trunk(tokens.int(), plan)[1]  # the same key; its graph's guards name int64 tokens
        # a graph of its own: compiled, or loaded where an earlier run saved it beside the int64 one
        assert forwards.graphs_built + forwards.graphs_loaded == found + 1
        assert torch.allclose(int32, expected, atol=1e-5)


def _one_token_plan(cfg) -> AttentionPlan:
    cache = LatentCache(cfg.num_hidden_layers, 1, 32, cfg.kv_lora_rank, cfg.qk_rope_head_dim, initial_length=5)
    positions = cache.lengths[:, None] + 0
    return AttentionPlan.over_cache(cache, positions, causal_visibility(1, 1, positions, 0))


def test_graphs_of_inputs_failing_each_others_guards_are_all_kept_on_disk(folder, tmp_path):
    """int64 and int32 token ids share a key but not guards: each gets its own saved graph, and a new runtime
    loads both (before, the second overwrote the first, and every process compiled again)."""
    tokens = torch.tensor([[7]])

    def forwards_after_both_calls():
        runtime = load(folder, device="cpu")
        runtime.compile(cache_dir=tmp_path)
        plan = _one_token_plan(runtime.config)
        with torch.inference_mode():
            expected = runtime.model.logits(runtime.model.forward_trunk(tokens, plan))
            for ids in (tokens, tokens.int(), tokens, tokens.int()):  # each switch fails the other's guards
                assert torch.allclose(runtime.forwards.trunk(ids, plan)[1], expected, atol=1e-5)
        return runtime.forwards

    first = forwards_after_both_calls()
    assert first.graphs_built == 2 and first.graphs_loaded == 2 and len(list(tmp_path.glob("*.graph"))) == 2
    second = forwards_after_both_calls()
    assert second.graphs_built == 0 and second.graphs_loaded == 4
    assert SAVED_VARIANTS >= 2


class _Function:
    """Stands in for a compiled function: counts guard checks, passing them or not."""

    def __init__(self, guards_pass: bool):
        self.guards_pass, self.checks = guards_pass, 0

    def disable_guard_check(self):
        pass

    def guard_check(self, *args):
        self.checks += 1
        return self.guards_pass


def _plan(capacity: int) -> AttentionPlan:
    cache = LatentCache(2, 1, capacity, 4, 2, initial_length=3)
    positions = cache.lengths[:, None] + 0
    return AttentionPlan.over_cache(cache, positions, causal_visibility(1, 1, positions, 0))


def test_a_step_graph_checks_its_guards_on_its_first_calls_per_cache_only():
    function = _Function(guards_pass=True)
    graph = StepGraph(function, Path("unused.graph"))
    plan = _plan(16)
    for _ in range(GUARD_CHECKS + 3):
        assert graph.admits((), plan)
    assert function.checks == GUARD_CHECKS
    assert graph.admits((), _plan(32))  # a new cache is checked again
    assert function.checks == GUARD_CHECKS + 1
    assert not StepGraph(_Function(guards_pass=False), Path("unused.graph")).admits((), plan)


def test_a_step_graph_checks_its_guards_again_for_step_tensors_in_a_new_layout():
    function = _Function(guards_pass=True)
    graph = StepGraph(function, Path("unused.graph"))
    plan, hidden = _plan(16), torch.zeros(1, 3, 8)
    for _ in range(GUARD_CHECKS + 2):
        assert graph.admits((hidden,), plan)
    assert function.checks == GUARD_CHECKS
    assert graph.admits((torch.zeros(1, 3, 16)[..., ::2],), plan)  # strided: checked
    assert graph.admits((hidden.to(torch.float64),), plan)  # another dtype: checked
    assert function.checks == GUARD_CHECKS + 2
    assert graph.admits((hidden + 1,), plan)  # contiguous again: known
    assert function.checks == GUARD_CHECKS + 2
    function.guards_pass = False
    assert not graph.admits((hidden.transpose(1, 2),), plan)
