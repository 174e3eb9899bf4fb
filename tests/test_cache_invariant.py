"""After every commit, the trunk and MTP caches equal what a fresh prefill of the same tokens builds.

The engine is driven step by step (Engine.run is a generator; `engine.batch` is the live state). The MTP cache
layout (drafter.py): module j (1-based) holds slots [j, L] and `stash[j-1]` is its output at slot L, where L is
the trunk length and the pending token t_L is not yet in the trunk cache.
"""

from __future__ import annotations

import pytest
import torch

from builders import TINY_V32, build_model
from mtp_runtime.cache import LatentCache
from mtp_runtime.engine import Engine
from mtp_runtime.index_cache import IndexKeys
from mtp_runtime.params import DraftParams, GenerationRequest

ATOL = 1e-4
PROMPTS = [[5], [17, 3, 44], [9, 9, 31, 2, 60, 12, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def mostly_right():
    return build_model(num_mtp=2, seed=3, context_scale=0.01, norm_std=0.0, eh_noise=0.0)


@pytest.fixture(scope="module")
def one_module():
    return build_model(num_mtp=1, seed=3, context_scale=0.003, norm_std=0.0, eh_noise=0.0)


@pytest.fixture(scope="module")
def random_model():
    return build_model(num_mtp=2, seed=0)


@pytest.fixture(scope="module")
def sparse_mostly_right():
    """DeepSeek-V3.2 (sparse attention, index_topk 3 of up to 40 keys): the caches hold indexer keys too."""
    return build_model(num_mtp=2, seed=3, context_scale=0.01, norm_std=0.0, eh_noise=0.0, **TINY_V32)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max()) if a.numel() else 0.0


def check_against_fresh_prefill(model, request, batch, prompts) -> None:
    """Every live row's caches equal a fresh prefill of prompt + generated[:-1]."""
    for row, seq in enumerate(batch.seq_ids.tolist()):
        generated = batch.generated[seq]
        tokens = prompts[seq] + generated[:-1]
        length = len(tokens)
        assert int(batch.trunk.lengths[row]) == length
        assert int(batch.pending[row]) == generated[-1]
        fresh = Engine(model, request)._prefill([tokens])
        assert int(fresh.pending[0]) == generated[-1]  # greedy: the fresh prefill picks the same next token
        trunk, ref = batch.trunk, fresh.trunk
        assert max_diff(trunk.c_kv[:, row, :length], ref.c_kv[:, 0, :length]) <= ATOL
        assert max_diff(trunk.k_pe[:, row, :length], ref.k_pe[:, 0, :length]) <= ATOL
        if trunk.index is not None:
            assert max_diff(trunk.index.keys[:, row, :length], ref.index.keys[:, 0, :length]) <= ATOL
        mtp, ref_mtp = batch.mtp, fresh.mtp
        assert int(mtp.cache.lengths[row]) == length + 1 == int(ref_mtp.cache.lengths[0])
        for j in range(1, model.num_mtp + 1):
            got_c, want_c = mtp.cache.c_kv[j - 1, row, j: length + 1], ref_mtp.cache.c_kv[j - 1, 0, j: length + 1]
            got_k, want_k = mtp.cache.k_pe[j - 1, row, j: length + 1], ref_mtp.cache.k_pe[j - 1, 0, j: length + 1]
            assert max_diff(got_c, want_c) <= ATOL, (j, seq, length)
            assert max_diff(got_k, want_k) <= ATOL, (j, seq, length)
            if mtp.cache.index is not None:
                got_i = mtp.cache.index.keys[j - 1, row, j: length + 1]
                assert max_diff(got_i, ref_mtp.cache.index.keys[j - 1, 0, j: length + 1]) <= ATOL, (j, seq, length)
        assert max_diff(mtp.stash[:, row], ref_mtp.stash[:, 0]) <= ATOL


def drive(model, draft: DraftParams, prompts, max_new_tokens: int) -> list[int]:
    """Run the engine, checking the caches after every step; returns the tokens committed per step."""
    request = GenerationRequest(max_new_tokens=max_new_tokens, draft=draft)
    engine = Engine(model, request)
    committed = []
    for step in engine.run(prompts):
        committed += [len(t) for t in step.new_tokens.values()]
        check_against_fresh_prefill(model, request, engine.batch, prompts)
    return committed


@pytest.mark.parametrize("draft", [
    DraftParams.build("chain", 3),
    DraftParams.build("chain", 5),
    DraftParams.build("tree", tree="3,2,1"),
    DraftParams.build("tree", tree=[[0], [1], [0, 0], [1, 0], [0, 0, 0]]),
    DraftParams.build("dynamic", 12, depth=5),
], ids=["chain3", "chain5", "tree321", "tree_paths", "dynamic12x5"])
def test_caches_equal_fresh_prefill_after_every_step(mostly_right, draft):
    committed = drive(mostly_right, draft, PROMPTS, max_new_tokens=30)
    assert max(committed) >= 3, committed  # multi-token commits happened
    assert sum(c >= 2 for c in committed) >= 5, committed


@pytest.mark.parametrize("draft", [DraftParams.build("chain", 3), DraftParams.build("tree", tree="2,2,2")],
                         ids=["chain3", "tree222"])
def test_caches_equal_fresh_prefill_one_module_reused(one_module, draft):
    committed = drive(one_module, draft, PROMPTS, max_new_tokens=24)
    assert max(committed) >= 3, committed


def test_caches_equal_fresh_prefill_random_drafts(random_model):
    """Mostly-rejected drafts: commits of the root alone must leave the scratch entries unused."""
    drive(random_model, DraftParams.build("tree", tree="3,2,1"), PROMPTS[1:3], max_new_tokens=12)


def test_caches_equal_fresh_prefill_across_long_prefill(mostly_right):
    """A prompt of >= 32 tokens is prefilled with expanded attention, later steps with absorbed attention."""
    prompt = [(7 * i + 3) % 64 for i in range(40)]
    committed = drive(mostly_right, DraftParams.build("chain", 3), [prompt, PROMPTS[1]], max_new_tokens=12)
    assert max(committed) >= 2


def test_the_check_detects_a_wrong_commit(mostly_right, monkeypatch):
    """Power check: committing the first scratch entries instead of the accepted path's must be caught."""
    original = LatentCache.commit

    def first_entries(self, offsets, counts):
        original(self, None, counts)

    monkeypatch.setattr(LatentCache, "commit", first_entries)
    with pytest.raises(AssertionError):
        drive(mostly_right, DraftParams.build("tree", tree="3,2,1"), PROMPTS, max_new_tokens=30)


@pytest.mark.parametrize("draft", [
    DraftParams.build("chain", 3),
    DraftParams.build("tree", tree="3,2,1"),
    DraftParams.build("dynamic", 12, depth=5),
], ids=["chain3", "tree321", "dynamic12x5"])
def test_sparse_caches_and_indexer_keys_equal_fresh_prefill_after_every_step(sparse_mostly_right, draft):
    long_prompt = [(7 * i + 3) % 64 for i in range(40)]  # prefilled with the masked dense path
    committed = drive(sparse_mostly_right, draft, PROMPTS[1:] + [long_prompt], max_new_tokens=20)
    assert max(committed) >= 3, committed


def test_the_check_detects_a_wrong_indexer_key_commit(sparse_mostly_right, monkeypatch):
    """Power check: a commit that moves the latents but not the indexer keys must be caught."""
    monkeypatch.setattr(IndexKeys, "move", lambda self, rows, src, dst: None)
    with pytest.raises(AssertionError):
        drive(sparse_mostly_right, DraftParams.build("tree", tree="3,2,1"), PROMPTS, max_new_tokens=30)
