"""Sampled speculative output has the distribution of plain sampling (docs/architecture.md, "One speculative
step").

On a 6-token vocabulary the exact law of the first three generated tokens is computed from the trunk
(p(t1) p(t2 | t1) p(t3 | t1, t2), each processed by logits_to_probs), and thousands of speculative samples are
checked against it with a chi-square goodness-of-fit test. The checkpoint's drafts are noisy (context_scale 0.3,
eh_noise 0.3), so drafts are both accepted and rejected and the residual distribution is exercised; its head is
halved so that even temperature 0.7 with top_p 0.8 leaves many cells.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

import mtp_runtime.engine as engine_module
from builders import build_checkpoint
from mtp_runtime import load
from mtp_runtime.sampling import SamplingParams, logits_to_probs
from mtp_runtime.verify.accept import accept_sampling

VOCAB = 6
PROMPT = [1, 2]
NEW = 3
SAMPLES = 6000
REJECT_Z = 4.0

SETTINGS = {
    "t1.0": dict(temperature=1.0),
    "t1.0_topk3": dict(temperature=1.0, top_k=3),
    "t0.7_topp0.8": dict(temperature=0.7, top_p=0.8),
}
DRAFTS = {
    "none": dict(draft="none"),
    "chain3": dict(draft="chain", num_draft_tokens=3),
    "tree321": dict(draft="tree", tree="3,2,1"),
    "dynamic": dict(draft="dynamic", num_draft_tokens=6, depth=3, draft_topk=2),
}


@pytest.fixture(scope="module")
def vocab6_runtime(tmp_path_factory):
    folder = build_checkpoint(tmp_path_factory.mktemp("vocab6"), vocab=VOCAB, num_mtp=2, seed=0, context_scale=0.3,
                              norm_std=0.0, eh_noise=0.3, head_scale=0.5)
    return load(folder, device="cpu")


def exact_distribution(vocab6_runtime, settings: dict) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under plain sampling from the trunk with these settings."""
    params = SamplingParams(**settings)
    seqs = [PROMPT + [a, b] for a, b in itertools.product(range(VOCAB), repeat=2)]
    probs = logits_to_probs(vocab6_runtime.logits(seqs), params).double()  # [36, P + 2, V]
    p = len(PROMPT)
    out = {}
    for i, (a, b) in enumerate(itertools.product(range(VOCAB), repeat=2)):
        for c in range(VOCAB):
            out[(a, b, c)] = float(probs[i, p - 1, a] * probs[i, p, b] * probs[i, p + 1, c])
    total = sum(out.values())
    assert abs(total - 1.0) < 1e-6
    return out


def chi_square_z(observed: Counter, expected_probs: dict, n: int) -> float:
    """Wilson-Hilferty z of Pearson's chi-square, cells with expected count < 5 merged; observations in
    cells of probability zero are an outright failure."""
    impossible = {cell: count for cell, count in observed.items() if expected_probs.get(cell, 0.0) == 0.0}
    assert not impossible, f"samples in zero-probability cells: {impossible}"
    cells = sorted(expected_probs, key=lambda c: expected_probs[c])
    bins: list[tuple[float, int]] = []
    pooled_e, pooled_o = 0.0, 0
    for cell in cells:
        e = expected_probs[cell] * n
        if e == 0:
            continue
        if e < 5:
            pooled_e += e
            pooled_o += observed.get(cell, 0)
        else:
            bins.append((e, observed.get(cell, 0)))
    if pooled_e > 0:
        if pooled_e < 5 and bins:
            e, o = bins.pop(0)
            pooled_e, pooled_o = pooled_e + e, pooled_o + o
        bins.append((pooled_e, pooled_o))
    df = len(bins) - 1
    assert df >= 5, "too few cells for a meaningful test"
    stat = sum((o - e) ** 2 / e for e, o in bins)
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def sample_sequences(vocab6_runtime, settings: dict, draft: dict, seed: int, n: int = SAMPLES):
    out = vocab6_runtime.generate(input_ids=[PROMPT] * n, max_new_tokens=NEW, seed=seed, **settings, **draft)
    counts = Counter(tuple(o.token_ids) for o in out)
    assert all(len(o.token_ids) == NEW for o in out)
    stats = out[0].stats
    for o in out[1:]:
        stats = stats.merge(o.stats)
    return counts, stats


def test_exact_law_depends_on_context(vocab6_runtime):
    """The target is not a bigram model: p(t3 | t1, t2) changes with t1 for a fixed t2."""
    law = exact_distribution(vocab6_runtime, dict(temperature=1.0))
    cond = np.array([[law[(a, 0, c)] for c in range(VOCAB)] for a in range(VOCAB)])
    cond /= cond.sum(axis=1, keepdims=True)
    assert np.abs(cond - cond[0]).max() > 0.01


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("draft", list(DRAFTS))
def test_speculative_samples_follow_the_plain_distribution(vocab6_runtime, setting, draft):
    if draft == "dynamic" and setting != "t1.0":
        pytest.skip("dynamic drafting is checked at temperature 1 only (time)")
    settings = SETTINGS[setting]
    counts, stats = sample_sequences(vocab6_runtime, settings, DRAFTS[draft], seed=11)
    if draft != "none":
        # both branches of the rejection rule ran: some drafts accepted, some rejected (residual used)
        attempts, accepts = sum(stats.depth_attempts), sum(stats.depth_accepts)
        assert 0 < accepts < attempts, (attempts, accepts)
        assert stats.depth_accepts[1] > 0  # depth-2 drafts were accepted too
    z = chi_square_z(counts, exact_distribution(vocab6_runtime, settings), SAMPLES)
    assert z < REJECT_Z, z


def exact_samples(vocab6_runtime, settings: dict, seed: int, n: int = SAMPLES) -> Counter:
    """n draws straight from the exact law (independent of the engine)."""
    law = exact_distribution(vocab6_runtime, settings)
    cells = list(law)
    p = np.array([law[c] for c in cells])
    draws = np.random.default_rng(seed).choice(len(cells), size=n, p=p / p.sum())
    return Counter(cells[i] for i in draws)


def test_power_a_different_temperature_is_rejected(vocab6_runtime):
    """The same test must reject samples drawn at temperature 1.5 against the law at 1.0 ..."""
    counts = exact_samples(vocab6_runtime, dict(temperature=1.5), seed=3)
    assert chi_square_z(counts, exact_distribution(vocab6_runtime, dict(temperature=1.0)), SAMPLES) > REJECT_Z
    counts, _ = sample_sequences(vocab6_runtime, dict(temperature=1.5), DRAFTS["chain3"], seed=3)
    assert chi_square_z(counts, exact_distribution(vocab6_runtime, dict(temperature=1.0)), SAMPLES) > REJECT_Z


def test_power_exact_samples_pass(vocab6_runtime):
    """... and accept samples of the law itself (the merged-cell statistic is not biased towards rejection)."""
    for seed in range(3):
        counts = exact_samples(vocab6_runtime, dict(temperature=1.0), seed=seed)
        assert chi_square_z(counts, exact_distribution(vocab6_runtime, dict(temperature=1.0)), SAMPLES) < REJECT_Z


def test_power_always_accepting_drafts_is_rejected(vocab6_runtime, monkeypatch):
    """A lossy rule (accept every draft, i.e. emit the draft distribution) must fail the same test."""

    def accept_as_if_draft_were_target(tree, target_probs, generator=None):
        drafted = tree.draft_probs.sum(dim=-1, keepdim=True) > 0  # leaves have no draft distribution
        return accept_sampling(tree, torch.where(drafted, tree.draft_probs, target_probs), generator)

    monkeypatch.setattr(engine_module, "accept_sampling", accept_as_if_draft_were_target)
    counts, _ = sample_sequences(vocab6_runtime, dict(temperature=1.0), DRAFTS["chain3"], seed=5)
    assert chi_square_z(counts, exact_distribution(vocab6_runtime, dict(temperature=1.0)), SAMPLES) > REJECT_Z


@pytest.mark.parametrize("draft", ["none", "chain3", "tree321"])
def test_same_seed_same_output_different_seed_different_output(vocab6_runtime, draft):
    def run(seed):
        out = vocab6_runtime.generate(input_ids=[PROMPT] * 16, max_new_tokens=8, temperature=1.0, seed=seed,
                          **DRAFTS.get(draft, dict(draft="none")))
        return [o.token_ids for o in out]

    first = run(123)
    assert run(123) == first
    assert run(124) != first
    assert len({tuple(t) for t in first}) > 1  # rows of one batch draw independently
