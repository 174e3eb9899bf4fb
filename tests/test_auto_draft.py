"""draft='auto': its choice rule, and that whatever it chooses the output is plain decoding's.

Step times on a shared machine are noise, so the engine tests give auto modelled costs (`ModelledCosts`): a chain
of k drafts costs 1 + 0.25 k plain steps. With drafts that are mostly right it must then draft deep chains, with drafts
that are never right it must fall back to plain decoding; both give exactly the plain greedy tokens.
"""

from __future__ import annotations

import pytest

from builders import build_checkpoint, build_mostly_right
from mtp_runtime import load
from mtp_runtime.auto_draft import (CARRIED_WEIGHT, EXPLORE_EVERY, FORGET, PRIOR_ACCEPTANCE, PRIOR_WEIGHT, AutoDraft,
                                    DepthAcceptance, ModelledCosts, StepCosts, non_decreasing)

PROMPTS = [[5], [17, 3, 44], [9, 9, 31, 2, 60, 12, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def mostly_right(tmp_path_factory):
    rt = load(build_mostly_right(tmp_path_factory.mktemp("auto_right"), num_mtp=2, seed=3), device="cpu")
    rt.step_costs = ModelledCosts(0.25)
    return rt


@pytest.fixture(scope="module")
def never_right(tmp_path_factory):
    rt = load(build_checkpoint(tmp_path_factory.mktemp("auto_random"), num_mtp=2, seed=0), device="cpu")
    rt.step_costs = ModelledCosts(0.25)
    return rt


def plain(rt, prompts, **kw):
    return [r.token_ids for r in rt.generate(input_ids=prompts, draft="none", max_new_tokens=48, **kw)]


@pytest.mark.parametrize("batched", [True, False])
def test_auto_is_lossless_and_drafts_deep_when_drafts_are_right(mostly_right, batched):
    groups = [PROMPTS] if batched else [[p] for p in PROMPTS]
    for prompts in groups:
        auto = mostly_right.generate(input_ids=prompts, draft="auto", max_new_tokens=48)
        assert [r.token_ids for r in auto] == plain(mostly_right, prompts)
        sizes = sum((r.stats.draft_sizes for r in auto), start=type(auto[0].stats.draft_sizes)())
        assert sum(v for k, v in sizes.items() if k >= 2) > 0.6 * sum(sizes.values()), sizes


def test_auto_falls_back_to_plain_decoding_when_drafts_are_never_right(never_right):
    auto = never_right.generate(input_ids=PROMPTS, draft="auto", max_new_tokens=48)
    assert [r.token_ids for r in auto] == plain(never_right, PROMPTS)
    sizes = sum((r.stats.draft_sizes for r in auto), start=type(auto[0].stats.draft_sizes)())
    assert sizes[0] > 0.75 * sum(sizes.values()), sizes


def test_auto_sampling_repeats_with_a_seed(tmp_path):
    """With measured (noisy) costs and earlier calls' acceptance too: seeded sampling chooses by modelled costs and
    the acceptance of its own call, so its draws repeat."""
    rt = load(build_mostly_right(tmp_path, num_mtp=2, seed=3), device="cpu")
    runs = []
    for _ in range(3):
        runs.append(rt.generate(input_ids=PROMPTS[2], draft="auto", max_new_tokens=32, temperature=0.8, seed=7))
        rt.generate(input_ids=PROMPTS[1], draft="auto", max_new_tokens=16)  # moves the runtime's acceptance
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids
    assert sum(runs[0].stats.draft_sizes.values()) > 0
    assert rt.depth_acceptance.attempts  # greedy calls record it; seeded ones neither read nor move it


def test_auto_respects_its_longest_chain(mostly_right):
    out = mostly_right.generate(input_ids=PROMPTS[3], draft="auto", num_draft_tokens=2, max_new_tokens=40)
    assert max(out.stats.draft_sizes) <= 2
    assert out.token_ids == [r.token_ids for r in mostly_right.generate(
        input_ids=[PROMPTS[3]], draft="none", max_new_tokens=40)][0]


# --- the choice rule -------------------------------------------------------------------------------------


def counted(*rates: float, weight: float = 1e6) -> DepthAcceptance:
    """Acceptance measured so often that the priors vanish: exactly `rates` per depth."""
    return DepthAcceptance([weight] * len(rates), [weight * r for r in rates])


def test_expected_tokens_follow_the_per_depth_rates():
    auto = AutoDraft(3, StepCosts())
    auto.estimate = counted(0.8, 0.5, 0.2)
    assert auto.expected_tokens(0) == 1.0
    assert auto.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    assert auto.expected_tokens(3) == pytest.approx(1 + 0.8 + 0.4 + 0.4 * 0.2)


def test_a_depth_seldom_drafted_leans_on_the_depth_above():
    rates = DepthAcceptance([100.0, 1.0], [95.0, 0.0]).rates(4)
    assert rates[0] == pytest.approx((95 + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (100 + PRIOR_WEIGHT))
    assert rates[1] == pytest.approx(PRIOR_WEIGHT * rates[0] / (1 + PRIOR_WEIGHT))  # one rejection: pulled down
    assert rates[2] == rates[3] == pytest.approx(rates[1])  # never drafted: the estimate above
    assert DepthAcceptance().rates(2) == [PRIOR_ACCEPTANCE, PRIOR_ACCEPTANCE]


def test_untried_depths_come_first_then_the_best_rate():
    costs = StepCosts()
    assert AutoDraft(2, costs).choose(1) == 1  # nothing measured yet: the shallowest untried chain
    costs.verify.update({(1, 1): 1.0})
    costs.draft.update({(1, 1): 0.1})
    assert AutoDraft(2, costs).choose(1) == 2
    costs.verify.update({(1, 0): 1.0, (1, 1): 1.0, (1, 2): 1.0})
    costs.draft.update({(1, 1): 0.1, (1, 2): 0.2})
    auto = AutoDraft(2, costs)
    auto.estimate = counted(0.9, 0.9)  # the deepest chain pays
    assert auto.choose(1) == 2
    auto.estimate = counted(0.0, 0.0)  # nothing accepted: plain decoding
    assert auto.choose(1) == 0


def test_a_deeper_chain_is_never_taken_for_cheaper():
    assert non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert non_decreasing([1.0, 3.0, 2.0, 4.0]) == pytest.approx([1.0, 2.5, 2.5, 4.0])
    assert non_decreasing([3.0, 1.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    costs = StepCosts()
    costs.verify.update({(1, 0): 1.0, (1, 1): 1.3, (1, 2): 0.8})  # depth 2 measured on lucky steps
    costs.draft.update({(1, 1): 0.2, (1, 2): 0.2})
    auto = AutoDraft(2, costs)
    auto.estimate = counted(0.2, 0.1)
    # as measured (1.0, 1.5, 1.0) depth 2 would win (1.22 tokens per unit); pooled (1.0, 1.25, 1.25) plain does
    assert auto.choose(1) == 0


def test_observe_counts_only_depths_whose_parent_was_accepted():
    estimate = DepthAcceptance()
    estimate.observe(3, [0, 3, 1])
    # depth 1 is tried by every row and kept by two; depth 2 is tried by those two; depth 3 by one (row 1)
    assert estimate.attempts == [3, 2, 1] and estimate.accepts == [2, 1, 1]
    estimate.observe(1, [1])
    assert estimate.attempts == pytest.approx([FORGET * 3 + 1, 2, 1])
    assert estimate.accepts == pytest.approx([FORGET * 2 + 1, 1, 1])


def test_a_call_starts_from_what_earlier_calls_measured_weighing_a_few_steps():
    history = counted(0.95, 0.9, weight=500.0)
    auto = AutoDraft(3, StepCosts(), history)
    assert auto.estimate.attempts == pytest.approx([CARRIED_WEIGHT, CARRIED_WEIGHT])
    assert auto.estimate.accepts == pytest.approx([0.95 * CARRIED_WEIGHT, 0.9 * CARRIED_WEIGHT])
    for _ in range(3):
        auto.observe(2, [0])  # a text whose drafts fail moves this call's estimate within a few steps
    assert auto.acceptance()[0] < 0.85
    assert history.attempts[0] == pytest.approx(500 * FORGET**3 + sum(FORGET**i for i in range(3)))


def test_plain_decoding_is_probed_less_and_less_often():
    costs = StepCosts()
    costs.verify.update({(1, 0): 1.0, (1, 1): 2.0})
    costs.draft.update({(1, 1): 1.0})
    auto = AutoDraft(1, costs)
    auto.attempts, auto.accepts = [100.0], [0.0]
    probes = [step for step in range(1, 400) if auto.choose(1) == 1]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes[0] == EXPLORE_EVERY and gaps == [2 * EXPLORE_EVERY * 2**i for i in range(len(gaps))], probes


def test_a_much_faster_step_replaces_a_slow_first_measurement():
    costs = StepCosts()
    costs.record(costs.verify, (1, 2), 5.0)  # e.g. a first call
    costs.record(costs.verify, (1, 2), 0.01)
    assert costs.verify[(1, 2)] == 0.01
    costs.record(costs.verify, (1, 2), 0.02)  # otherwise the estimate moves gradually, either way
    costs.record(costs.verify, (1, 2), 0.006)
    assert 0.006 < costs.verify[(1, 2)] < 0.02


def test_steps_that_compiled_a_graph_are_not_timed(tmp_path):
    """A step that compiled costs minutes once: recorded, it would keep auto off that depth for the whole run."""
    from mtp_runtime.forwards import Forwards

    class CompilesEveryCall(Forwards):
        def trunk(self, tokens, plan):
            self.compile_seconds += 60.0
            return super().trunk(tokens, plan)

    rt = load(build_mostly_right(tmp_path, num_mtp=2, seed=3), device="cpu")
    rt.forwards = CompilesEveryCall(rt.model)
    auto = rt.generate(input_ids=PROMPTS[2], draft="auto", max_new_tokens=24)
    assert auto.token_ids == rt.generate(input_ids=PROMPTS[2], draft="none", max_new_tokens=24).token_ids
    assert not rt.step_costs.verify and not rt.step_costs.draft
